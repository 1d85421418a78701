"""``auth.mode = "jwt"``: signed tokens, verified against configured keys only.

Only the configured algorithms are accepted, and each key serves only its
own family: HMAC secrets verify HS* tokens, public keys verify RS*/PS*/ES*/
EdDSA tokens — so ``alg: none`` and HS/RS key confusion are impossible by
construction. Several keys may be configured for rotation; a token's ``kid``
picks the key when present.

Key files (read strictly by ``broker.keyfiles``): ``secret_file`` holds one
``<secret>`` or ``<kid> <secret>`` per line; ``public_key_file`` holds PEM
public keys, each optionally preceded by a ``kid: <name>`` line. An EC key
verifies only the algorithm of its curve (P-256 ES256, P-384 ES384, P-521
ES512), so a token is only ever tried against keys that can check it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import HMACAlgorithm

from broker.auth import ANONYMOUS, Credentials, Identity
from broker.auth.grants import Grants, expand
from broker.config import Config, JwtConfig, read_config_file
from broker.errors import ConfigError, Unauthorized
from broker.ids import as_id
from broker.keyfiles import (
    ED_ALGORITHMS,
    HMAC_ALGORITHMS,
    RSA_ALGORITHMS,
    PublicKey,
    parse_public_keys,
    parse_secrets,
)

_HMAC = frozenset(HMAC_ALGORITHMS)  # the set operations below read better on a set
MAX_EXP = 1 << 40  # year 36812: later "expiries" are garbage, not tokens

# PyJWT checks an EC key's curve against the token's alg and raises
# InvalidKeyError on a mismatch: each curve serves exactly one alg.
_EC_CURVE_ALGS: dict[str, frozenset[str]] = {
    ec.SECP256R1.name: frozenset({"ES256"}),
    ec.SECP384R1.name: frozenset({"ES384"}),
    ec.SECP521R1.name: frozenset({"ES512"}),
}


@dataclass(frozen=True, slots=True)
class Key:
    algorithms: frozenset[str]
    material: Any = field(repr=False)  # bytes secret or a cryptography public key
    kid: str | None = None

    @property
    def fingerprint(self) -> str:
        """Names this key (not its kid) without revealing it: what a stream keeps
        to learn, on reload, whether the key that let it in is still trusted."""
        raw = self.material
        if not isinstance(raw, bytes):
            raw = raw.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(b"sse-broker jwt key\0" + raw).hexdigest()[:32]


def _public_algorithms(entry: PublicKey, path: str) -> frozenset[str]:
    key = entry.key
    where = f"auth.jwt.public_key_file: {path} line {entry.line}"
    if isinstance(key, rsa.RSAPublicKey):
        return frozenset(RSA_ALGORITHMS)
    if isinstance(key, ec.EllipticCurvePublicKey):
        algs = _EC_CURVE_ALGS.get(key.curve.name)
        if algs is None:
            raise ConfigError(
                f"{where}: EC curve {key.curve.name} has no accepted algorithm "
                "(P-256 for ES256, P-384 for ES384, P-521 for ES512)"
            )
        return algs
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset(ED_ALGORITHMS)
    raise ConfigError(f"{where}: unsupported key type {type(key).__name__}")


def _hmac_secret(where: str, secret: str) -> bytes:
    """The secret as bytes, refused at load if PyJWT would refuse it at every verify."""
    raw = secret.encode()
    try:
        # PyJWT rejects secrets that look like PEM, SSH, DER or JWK keys (key
        # confusion); found per request, that would be an error for every token.
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(raw)
    except jwt.InvalidKeyError as exc:
        raise ConfigError(f"{where}: unusable HMAC secret: {exc}") from None
    return raw


def load_keys(cfg: JwtConfig) -> list[Key]:
    """Every verification key the config names, each tied to the algorithms it can verify.

    Raises ConfigError naming the key, file and line for any malformed key file.
    """
    allowed = frozenset(cfg.algorithms)
    keys: list[Key] = []
    if cfg.secret:
        keys.append(Key(_HMAC & allowed, _hmac_secret("auth.jwt.secret", cfg.secret)))
    if cfg.secret_file:
        name, path = "auth.jwt.secret_file", cfg.secret_file
        for entry in parse_secrets(name, path, read_config_file(name, path)):
            secret = _hmac_secret(f"{name}: {path} line {entry.line}", entry.secret)
            keys.append(Key(_HMAC & allowed, secret, entry.kid))
    if cfg.public_key_file:
        name, path = "auth.jwt.public_key_file", cfg.public_key_file
        for pub in parse_public_keys(name, path, read_config_file(name, path)):
            keys.append(Key(_public_algorithms(pub, path) & allowed, pub.key, pub.kid))
        if not any(k.algorithms - _HMAC for k in keys):
            raise ConfigError(
                f"auth.jwt.public_key_file: no public key for {sorted(allowed - _HMAC)} "
                f"in {cfg.public_key_file}"
            )
    keys = [k for k in keys if k.algorithms]
    if not keys:
        raise ConfigError(
            f"auth.jwt: no key matches auth.jwt.algorithms = {sorted(allowed)} "
            "(HS* need secret or secret_file; others need public_key_file)"
        )
    return keys


def _claim_id(claims: dict[str, Any], name: str) -> str | None:
    if not name or claims.get(name) is None:
        return None
    return as_id(
        claims[name], lambda why: Unauthorized(f"token claim {name!r}: {why}", code="bad_claims")
    )


class JwtAuth:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg.auth.jwt
        self.grants = cfg.auth.grants
        self.keys = load_keys(self.cfg)
        self.algorithms = frozenset(self.cfg.algorithms)
        # One str object per key, shared by every stream it let in.
        self._fingerprints = {id(k): k.fingerprint for k in self.keys}
        self._trusted = frozenset(self._fingerprints.values())

    def verifies(self, key: str) -> bool:
        return key in self._trusted

    async def authenticate(self, creds: Credentials, channels: tuple[str, ...]) -> Identity:
        if creds.token is None:
            return ANONYMOUS
        claims, key = self.verify_with_key(creds.token)
        c = self.cfg
        user = _claim_id(claims, c.user_claim)
        tenant = _claim_id(claims, c.tenant_claim)
        granted = claims.get(c.channels_claim, []) if c.channels_claim else []
        if not isinstance(granted, list) or not all(isinstance(g, str) for g in granted):
            raise Unauthorized(
                f"token claim {c.channels_claim!r} must be a list of strings", code="bad_claims"
            )
        exp = claims["exp"]
        # PyJWT accepts any number; a float cannot hold every int, and a stream
        # needs a real deadline.
        if isinstance(exp, bool) or not isinstance(exp, int | float) or not 0 < exp < MAX_EXP:
            raise Unauthorized("token claim 'exp' is out of range", code="bad_claims")
        return Identity(
            user=user,
            tenant=tenant,
            grants=Grants.compile(expand([*granted, *self.grants], user, tenant)),
            key=self._fingerprints[id(key)],
            expires_at=float(exp),
        )

    def verify(self, token: str) -> dict[str, Any]:
        """The verified claims, or Unauthorized whose code says what was wrong."""
        return self.verify_with_key(token)[0]

    def verify_with_key(self, token: str) -> tuple[dict[str, Any], Key]:
        """The verified claims and the key that verified them, or Unauthorized."""
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, UnicodeError):
            # PyJWTError is the root: none may become a 500. UnicodeError: a
            # token of non-UTF-8 bytes (aiohttp passes them on as surrogates).
            raise Unauthorized("malformed token", code="malformed_token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Unauthorized(f"token algorithm {alg!r} is not accepted", code="bad_algorithm")
        kid = header.get("kid")
        candidates = [k for k in self.keys if alg in k.algorithms]
        if not candidates:
            # Accepted, but no key can check it (e.g. ES384 with only a P-256 key).
            raise Unauthorized(f"no configured key verifies {alg} tokens", code="bad_algorithm")
        if isinstance(kid, str) and any(k.kid == kid for k in candidates):
            candidates = [k for k in candidates if k.kid == kid]
        elif kid is not None:
            candidates = [k for k in candidates if k.kid is None]
        if not candidates:
            raise Unauthorized(f"no key for token kid {kid!r}", code="unknown_kid")
        c = self.cfg
        last: jwt.PyJWTError | None = None
        for key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.material,
                    algorithms=[alg],
                    audience=c.audience or None,
                    issuer=c.issuer or None,
                    leeway=c.leeway_seconds,
                    # verify_sub off: PyJWT >= 2.10 refuses an integer "sub",
                    # which PHP apps send ('sub' => $user->id); _claim_id takes it.
                    options={
                        "require": ["exp"],
                        "verify_aud": bool(c.audience),
                        "verify_sub": False,
                    },
                )
                return claims, key
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError) as exc:
                # Another rotation key may match. A key PyJWT refuses for this
                # alg cannot verify the token either (candidates are filtered
                # by alg, so this is a safety net, not a path).
                last = exc
            except jwt.ExpiredSignatureError:
                raise Unauthorized("token expired", code="token_expired") from None
            except jwt.InvalidAudienceError:
                raise Unauthorized("token audience not accepted", code="bad_audience") from None
            except jwt.InvalidIssuerError:
                raise Unauthorized("token issuer not accepted", code="bad_issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise Unauthorized(f"token lacks claim {exc.claim!r}", code="bad_claims") from None
            except jwt.PyJWTError as exc:  # the root, not only InvalidTokenError
                raise Unauthorized(f"invalid token: {exc}", code="invalid_token") from None
        raise Unauthorized("token signature does not verify", code="bad_signature") from last

    async def close(self) -> None:
        return None


def mint(cfg: Config, *, user: str, tenant: str | None, channels: list[str], ttl: int) -> str:
    """A development token signed with the configured HMAC secret (``sse-broker token``)."""
    secrets = [k for k in load_keys(cfg.auth.jwt) if k.algorithms & _HMAC]
    if not secrets:
        raise ConfigError("sse-broker token needs auth.jwt.secret or secret_file (an HS* key)")
    key = secrets[0]
    alg = next(a for a in cfg.auth.jwt.algorithms if a in _HMAC)
    c = cfg.auth.jwt
    now = int(time.time())
    claims: dict[str, Any] = {c.user_claim: user, "iat": now, "exp": now + ttl}
    if tenant is not None and c.tenant_claim:
        claims[c.tenant_claim] = tenant
    if channels and c.channels_claim:
        claims[c.channels_claim] = channels
    if c.audience:
        claims["aud"] = c.audience
    if c.issuer:
        claims["iss"] = c.issuer
    headers = {"kid": key.kid} if key.kid else None
    return jwt.encode(claims, key.material, algorithm=alg, headers=headers)
