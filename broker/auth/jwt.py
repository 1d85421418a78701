"""``auth.mode = "jwt"``: signed tokens, verified against configured keys only.

Only the configured algorithms are accepted, and each key serves only its
own family: HMAC secrets verify HS* tokens, public keys verify RS*/PS*/ES*/
EdDSA tokens — so ``alg: none`` and HS/RS key confusion are impossible by
construction. Several keys may be configured for rotation; a token's ``kid``
picks the key when present.

Key files: ``secret_file`` holds one secret per line, optionally preceded by
its kid (``<kid> <secret>``); ``public_key_file`` holds PEM public keys, each
optionally preceded by a ``kid: <name>`` line.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker.auth import ANONYMOUS, Credentials, Identity
from broker.auth.grants import Grants, expand
from broker.config import Config, JwtConfig, read_config_file
from broker.errors import ConfigError, Unauthorized

HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGS = frozenset({"ES256", "ES384", "ES512"})
ED_ALGS = frozenset({"EdDSA"})
MAX_EXP = 1 << 40  # year 36812: later "expiries" are garbage, not tokens

_PEM_BLOCK = re.compile(
    r"(?:^kid:\s*(?P<kid>\S+)\s*\n)?(?P<pem>-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----)",
    re.S | re.M,
)


@dataclass(frozen=True, slots=True)
class Key:
    algorithms: frozenset[str]
    material: Any = field(repr=False)  # bytes secret or a cryptography public key
    kid: str | None = None


def _public_algorithms(key: Any) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return EC_ALGS
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ED_ALGS
    raise ConfigError(f"auth.jwt.public_key_file: unsupported key type {type(key).__name__}")


def load_keys(cfg: JwtConfig) -> list[Key]:
    """Every verification key the config names, each tied to its algorithm family."""
    allowed = frozenset(cfg.algorithms)
    keys: list[Key] = []
    if cfg.secret:
        keys.append(Key(HMAC_ALGS & allowed, cfg.secret.encode()))
    if cfg.secret_file:
        for line in read_config_file("auth.jwt.secret_file", cfg.secret_file).splitlines():
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            kid, secret = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
            keys.append(Key(HMAC_ALGS & allowed, secret.encode(), kid))
    if cfg.public_key_file:
        text = read_config_file("auth.jwt.public_key_file", cfg.public_key_file)
        for match in _PEM_BLOCK.finditer(text):
            try:
                public = load_pem_public_key(match.group("pem").encode())
            except ValueError as exc:
                raise ConfigError(f"auth.jwt.public_key_file: bad PEM key: {exc}") from None
            keys.append(Key(_public_algorithms(public) & allowed, public, match.group("kid")))
        if not any(k.algorithms - HMAC_ALGS for k in keys):
            raise ConfigError(
                f"auth.jwt.public_key_file: no public key for {sorted(allowed - HMAC_ALGS)} "
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
    value = claims[name]
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise Unauthorized(f"token claim {name!r} must be a string or an integer", code="bad_claims")


class JwtAuth:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg.auth.jwt
        self.grants = cfg.auth.grants
        self.keys = load_keys(self.cfg)
        self.algorithms = frozenset(self.cfg.algorithms)

    async def authenticate(self, creds: Credentials, channels: tuple[str, ...]) -> Identity:
        if creds.token is None:
            return ANONYMOUS
        claims = self.verify(creds.token)
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
            expires_at=float(exp),
        )

    def verify(self, token: str) -> dict[str, Any]:
        """The verified claims, or Unauthorized whose code says what was wrong."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthorized("malformed token", code="malformed_token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Unauthorized(f"token algorithm {alg!r} is not accepted", code="bad_algorithm")
        kid = header.get("kid")
        candidates = [k for k in self.keys if alg in k.algorithms]
        if isinstance(kid, str) and any(k.kid == kid for k in candidates):
            candidates = [k for k in candidates if k.kid == kid]
        elif kid is not None:
            candidates = [k for k in candidates if k.kid is None]
        if not candidates:
            raise Unauthorized(f"no key for token kid {kid!r}", code="unknown_kid")
        c = self.cfg
        last: jwt.InvalidTokenError | None = None
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
                return claims
            except jwt.InvalidSignatureError as exc:
                last = exc  # another rotation key may match
            except jwt.ExpiredSignatureError:
                raise Unauthorized("token expired", code="token_expired") from None
            except jwt.InvalidAudienceError:
                raise Unauthorized("token audience not accepted", code="bad_audience") from None
            except jwt.InvalidIssuerError:
                raise Unauthorized("token issuer not accepted", code="bad_issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise Unauthorized(f"token lacks claim {exc.claim!r}", code="bad_claims") from None
            except jwt.InvalidTokenError as exc:
                raise Unauthorized(f"invalid token: {exc}", code="invalid_token") from None
        raise Unauthorized("token signature does not verify", code="bad_signature") from last

    async def close(self) -> None:
        return None


def mint(cfg: Config, *, user: str, tenant: str | None, channels: list[str], ttl: int) -> str:
    """A development token signed with the configured HMAC secret (``sse-broker token``)."""
    secrets = [k for k in load_keys(cfg.auth.jwt) if k.algorithms & HMAC_ALGS]
    if not secrets:
        raise ConfigError("sse-broker token needs auth.jwt.secret or secret_file (an HS* key)")
    key = secrets[0]
    alg = next(a for a in cfg.auth.jwt.algorithms if a in HMAC_ALGS)
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
