"""Auth building blocks as pure functions: grants, authorize, client address,
credentials, CORS and JWT verification (no broker process, no sockets).

Request objects are aiohttp's own (``make_mocked_request``) over a tiny
transport that only reports a peer address.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.access import Cors, client_ip, credentials, trusted_networks
from broker.auth import ANONYMOUS, Credentials, Identity, NoAuth, authorize
from broker.auth.grants import Grants, escape_glob, expand, public_allows
from broker.auth.jwt import JwtAuth, load_keys
from broker.config import Config, load_config
from broker.errors import ConfigError, Forbidden, Unauthorized

SECRET = "unit-secret-" + "0123456789abcdef" * 4
OTHER_SECRET = "unit-other-secret-" + "fedcba9876543210" * 4

# -- grants --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("u1", "u1"),
        ("*", "[*]"),
        ("?", "[?]"),
        ("[", "[[]"),
        ("a*b?c[d]", "a[*]b[?]c[[]d]"),
        ("]", "]"),
        ("", ""),
    ],
)
def test_escape_glob_table(value: str, escaped: str) -> None:
    assert escape_glob(value) == escaped


@pytest.mark.parametrize(
    ("patterns", "user", "tenant", "expanded"),
    [
        (["user.{user}"], "42", None, ["user.42"]),
        (["tenant.{tenant}.*"], None, "t1", ["tenant.t1.*"]),
        (["t.{tenant}.u.{user}"], "u1", "t1", ["t.t1.u.u1"]),
        # a placeholder the identity lacks grants nothing (never "user.")
        (["user.{user}", "news"], None, None, ["news"]),
        (["tenant.{tenant}.*"], "u1", None, []),
        (["t.{tenant}.u.{user}"], "u1", None, []),
        (["user.{user}"], "*", None, ["user.[*]"]),
        (["tenant.{tenant}.*"], None, "a*", ["tenant.a[*].*"]),
        # the pattern's own glob characters stay globs
        (["feed.*", "user.{user}.?"], "u[1]", None, ["feed.*", "user.u[[]1].?"]),
        # one pass: a value that reads like a placeholder stays literal
        (["user.{user}"], "{tenant}", "acme", ["user.{tenant}"]),
        (["t.{tenant}.u.{user}"], "{user}", "{user}", ["t.{user}.u.{user}"]),
        # a separator inside an id is fine where no wildcard follows
        (["user.{user}"], "ada.l@example.com", None, ["user.ada.l@example.com"]),
        (["tenant.{tenant}:*"], None, "a.b", ["tenant.a.b:*"]),
    ],
)
def test_expand_table(
    patterns: list[str], user: str | None, tenant: str | None, expanded: list[str]
) -> None:
    assert expand(patterns, user, tenant) == expanded


INJECTION_IDS = [
    "*",
    "a*",
    "?",
    "??",
    "[x]",
    "[!x]",
    "[a-z]*",
    ".",
    "user.*",
    "*.*",
    "]",
    "[",
    "\\",
]


@pytest.mark.parametrize(
    ("patterns", "user", "tenant"),
    [
        (["tenant.{tenant}.*"], None, "a.b"),
        (["tenant.{tenant}:*"], None, "a:b"),
        (["u.{user}-x.*"], "a-b", None),
        (["t.{tenant}.u.{user}.*"], "u.1", "t"),
        (["tenant.{tenant}*"], None, "a"),  # a config error too (config._pattern)
        (["{user}{tenant}.*"], "a", "b"),
    ],
)
def test_ids_that_could_cross_into_another_identity_are_refused(
    patterns: list[str], user: str | None, tenant: str | None
) -> None:
    with pytest.raises(Forbidden) as refused:
        expand(patterns, user, tenant)
    assert refused.value.code == "ambiguous_identity"


@pytest.mark.parametrize("evil", INJECTION_IDS)
def test_placeholder_values_widen_nothing(evil: str) -> None:
    if "." in evil:
        with pytest.raises(Forbidden):
            expand(["tenant.{tenant}.*"], evil, evil)
    patterns = ["user.{user}"] if "." in evil else ["user.{user}", "tenant.{tenant}.*"]
    grants = Grants.compile(expand(patterns, evil, evil))
    for victim in ["user.u1", "user.a", "user.ab", "user.x", "user..", "user.user.u1", "user.?"]:
        if victim != "user." + evil:
            assert not grants.allows(victim), (evil, victim)
    for victim in ["tenant.t1.orders", "tenant.a.x", "tenant.x.y", "tenant...z"]:
        if not victim.startswith(f"tenant.{evil}."):
            assert not grants.allows(victim), (evil, victim)
    assert grants.allows("user." + evil)
    assert grants.allows(f"tenant.{evil}.anything") is ("." not in evil)


# Ids as an app could produce them (usernames, emails, odd bytes).
ids = st.text(min_size=1, max_size=12)
channels = st.one_of(
    st.text(max_size=20),
    ids.map(lambda u: "user." + u),
    st.tuples(ids, st.text(max_size=6)).map(lambda p: f"tenant.{p[0]}.{p[1]}"),
)


@settings(max_examples=300, deadline=None)
@given(user=ids, tenant=ids, channel=channels)
def test_placeholder_grants_match_exactly_their_own_literal(
    user: str, tenant: str, channel: str
) -> None:
    if "." in tenant:
        with pytest.raises(Forbidden):
            expand(["tenant.{tenant}.*"], user, tenant)
        return
    grants = Grants.compile(expand(["user.{user}", "tenant.{tenant}.*"], user, tenant))
    expected = channel == f"user.{user}" or channel.startswith(f"tenant.{tenant}.")
    assert grants.allows(channel) is expected


@settings(max_examples=300, deadline=None)
@given(mine=ids, theirs=ids, rest=st.text(max_size=8))
def test_no_admitted_tenant_matches_another_admitted_tenants_channels(
    mine: str, theirs: str, rest: str
) -> None:
    if mine == theirs or "." in mine or "." in theirs:
        return  # the same tenant, or one refused (ambiguous_identity)
    grants = Grants.compile(expand(["tenant.{tenant}.*"], None, mine))
    assert not grants.allows(f"tenant.{theirs}.{rest}")


def test_grants_are_anchored_globs() -> None:
    grants = Grants.compile(["news", "orders.*", "room.?"])
    assert grants.allows("news")
    assert not grants.allows("news2") and not grants.allows("xnews")
    assert grants.allows("orders.1") and grants.allows("orders.") and grants.allows("orders.a.b")
    assert not grants.allows("orders")
    assert grants.allows("room.1") and not grants.allows("room.12")
    assert not Grants.compile([]).allows("news")


@pytest.mark.parametrize("public", [["*"], ["private-*"], ["presence-*"], ["*-*"], ["p*"]])
def test_public_patterns_never_open_private_or_presence(public: list[str]) -> None:
    grants = Grants.compile(public)
    for channel in ["private-orders.1", "presence-room.1", "private-", "presence-"]:
        assert not public_allows(grants, channel), (public, channel)


def test_public_patterns_open_other_channels() -> None:
    assert public_allows(Grants.compile(["*"]), "status")
    assert public_allows(Grants.compile(["status.*"]), "status.board")
    assert not public_allows(Grants.compile(["status.*"]), "orders")
    assert not public_allows(Grants.compile([]), "status")


# -- authorize -----------------------------------------------------------------------------


def test_authorize_anonymous_needs_credentials_in_auth_modes() -> None:
    public = Grants.compile(["status"])
    authorize(ANONYMOUS, public, ("status",), anonymous_may_log_in=True)
    with pytest.raises(Unauthorized) as exc:
        authorize(ANONYMOUS, public, ("status", "orders"), anonymous_may_log_in=True)
    assert exc.value.status == 401 and exc.value.code == "credentials_required"
    assert "orders" in exc.value.message
    # mode none: credentials would not help, so it is 403
    with pytest.raises(Forbidden) as forbidden:
        authorize(ANONYMOUS, public, ("orders",), anonymous_may_log_in=False)
    assert forbidden.value.status == 403 and "orders" in forbidden.value.message


def test_authorize_names_the_first_ungranted_channel() -> None:
    identity = Identity(user="u1", grants=Grants.compile(["a", "b.*"]))
    authorize(identity, Grants.compile([]), ("a", "b.1"), anonymous_may_log_in=True)
    with pytest.raises(Forbidden) as exc:
        authorize(identity, Grants.compile([]), ("a", "c", "d"), anonymous_may_log_in=True)
    assert exc.value.code == "channel_forbidden"
    assert "'c'" in exc.value.message and "'d'" not in exc.value.message


def test_authorize_identity_with_public_channels_and_protected_prefixes() -> None:
    identity = Identity(user="u1", grants=Grants.compile(["user.u1"]))
    public = Grants.compile(["*"])
    authorize(identity, public, ("user.u1", "status"), anonymous_may_log_in=True)
    for protected in ("private-x", "presence-x"):
        with pytest.raises(Forbidden):
            authorize(identity, public, (protected,), anonymous_may_log_in=True)
        with pytest.raises(Unauthorized):
            authorize(ANONYMOUS, public, (protected,), anonymous_may_log_in=True)
    # an identity with no user and no grants is not anonymous: 403, not 401
    with pytest.raises(Forbidden):
        authorize(Identity(), Grants.compile([]), ("x",), anonymous_may_log_in=True)


async def test_noauth_is_anonymous_whatever_the_credentials() -> None:
    identity = await NoAuth().authenticate(
        Credentials(token="anything", authorization="Bearer x"), ("a",)
    )
    assert identity is ANONYMOUS


# -- client address ------------------------------------------------------------------------


class PeerTransport(asyncio.Transport):
    """A transport that only knows its peer (what aiohttp reads for ``request.remote``)."""

    def __init__(self, peer: Any) -> None:
        super().__init__()
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


def request(
    path: str = "/events?channel=a",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    peer: Any = ("10.0.0.1", 40000),
) -> web.Request:
    from multidict import CIMultiDict

    return make_mocked_request(
        "GET", path, headers=CIMultiDict(headers or {}), transport=PeerTransport(peer)
    )


@pytest.mark.parametrize(
    ("peer", "trusted", "xff", "expected"),
    [
        # an untrusted peer's header is ignored, whatever it says
        ("10.0.0.1", [], ["1.2.3.4"], "10.0.0.1"),
        ("10.0.0.1", ["127.0.0.1"], ["1.2.3.4"], "10.0.0.1"),
        ("203.0.113.5", ["10.0.0.0/8"], ["10.0.0.9"], "203.0.113.5"),
        # a trusted proxy's header is walked from the right
        ("127.0.0.1", ["127.0.0.1"], ["1.2.3.4"], "1.2.3.4"),
        ("127.0.0.1", ["127.0.0.1"], ["6.6.6.6, 1.2.3.4"], "1.2.3.4"),
        ("10.0.0.1", ["10.0.0.0/8"], ["6.6.6.6, 1.2.3.4, 10.0.0.2"], "1.2.3.4"),
        ("10.0.0.1", ["10.0.0.0/8"], ["6.6.6.6", "1.2.3.4, 10.0.0.3"], "1.2.3.4"),
        # everything trusted: the leftmost hop
        ("10.0.0.1", ["10.0.0.0/8"], ["10.0.0.7, 10.0.0.8"], "10.0.0.7"),
        # trusted proxy but no header: the peer
        ("127.0.0.1", ["127.0.0.1"], [], "127.0.0.1"),
        ("::1", ["::1"], ["2001:db8::1"], "2001:db8::1"),
        ("::1", [], ["2001:db8::1"], "::1"),
    ],
)
def test_client_ip_believes_forwarded_for_only_from_trusted_proxies(
    peer: str, trusted: list[str], xff: list[str], expected: str
) -> None:
    req = request(headers=[("X-Forwarded-For", v) for v in xff], peer=(peer, 1234))
    assert client_ip(req, trusted_networks(trusted)) == expected


def test_client_ip_behind_a_unix_socket_proxy_trusts_its_header() -> None:
    req = request(headers={"X-Forwarded-For": "198.51.100.7"}, peer="")
    assert client_ip(req, trusted_networks([])) == "198.51.100.7"


# -- credentials ---------------------------------------------------------------------------


def config(*sets: str) -> Config:
    return load_config(None, overrides=["auth.mode=jwt", f"auth.jwt.secret={SECRET}", *sets])


@pytest.mark.parametrize(
    ("path", "headers", "token"),
    [
        ("/e?token=q", {"Authorization": "Bearer b", "Cookie": "sse_token=c"}, "b"),
        ("/e?token=q", {"Authorization": "bearer b"}, "b"),
        ("/e?token=q", {"Cookie": "sse_token=c"}, "q"),
        ("/e", {"Cookie": "sse_token=c; other=o"}, "c"),
        # present means non-empty; another scheme is not a token
        ("/e?token=q", {"Authorization": "Bearer   "}, "q"),
        ("/e?token=q", {"Authorization": "Basic dTpw"}, "q"),
        ("/e?token=", {"Cookie": "sse_token=c"}, "c"),
        ("/e?token=", {"Cookie": "sse_token="}, None),
        ("/e", {}, None),
    ],
)
def test_credentials_first_present_wins(path: str, headers: dict[str, str], token: str) -> None:
    creds = credentials(request(path, headers), config(), "10.0.0.1", via_proxy=True)
    assert creds.token == token


def test_credentials_sources_can_be_renamed_or_disabled() -> None:
    req = request("/e?token=q&t=q2", {"Cookie": "sse_token=c; jwt=c2"})
    assert (
        credentials(req, config("auth.query_param=t", "auth.cookie=jwt"), "", via_proxy=False).token
        == "q2"
    )
    assert credentials(req, config("auth.query_param=''"), "", via_proxy=False).token == "c"
    assert (
        credentials(req, config("auth.query_param=''", "auth.cookie=''"), "", via_proxy=False).token
        is None
    )


def test_credentials_carry_what_callbacks_forward_but_never_print_secrets() -> None:
    req = request(
        "/e?channel=a&socket_id=1.2",
        {
            "Authorization": "Bearer s3cr3t-bearer",
            "Cookie": "laravel_session=s3cr3t-session",
            "Host": "sse.example.com",
            "X-Forwarded-For": "1.2.3.4",
            "X-Forwarded-Host": "app.example.com",
        },
    )
    creds = credentials(req, config(), "1.2.3.4", via_proxy=True)
    assert creds.authorization == "Bearer s3cr3t-bearer"
    assert creds.cookies == {"laravel_session": "s3cr3t-session"}
    assert (creds.host, creds.forwarded_host, creds.socket_id) == (
        "sse.example.com",
        "app.example.com",
        "1.2",
    )
    assert "s3cr3t" not in repr(creds)


# -- CORS ----------------------------------------------------------------------------------

CORS = Cors(["https://dash.other.org", "https://*.example.com"])


@pytest.mark.parametrize(
    "origin",
    [
        "https://dash.other.org",
        "https://app.example.com",
        "https://a.b.example.com",
        "HTTPS://APP.EXAMPLE.COM",
    ],
)
def test_cors_allows_exact_and_wildcard_origins(origin: str) -> None:
    assert CORS.headers(origin) == {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
    }
    pre = CORS.preflight_headers(origin)
    assert pre["Access-Control-Allow-Origin"] == origin
    assert "GET" in pre["Access-Control-Allow-Methods"]
    assert "Last-Event-ID" in pre["Access-Control-Allow-Headers"]
    assert "Authorization" in pre["Access-Control-Allow-Headers"]


@pytest.mark.parametrize(
    "origin",
    [
        "https://example.com",  # the bare suffix is not a subdomain
        "https://example.com.evil.com",
        "https://evilexample.com",
        "https://app.evilexample.com",
        "http://app.example.com",  # scheme differs
        "https://app.example.com.",
        "https://app.example.com:8443",
        "https://app_x.example.com/",
        "https://dash.other.org.evil.com",
        "https://xdash.other.org",
        "http://dash.other.org",
        "null",
        "",
        "https://*.example.com",
        "https://a.example.com\nX-Evil: 1",
    ],
)
def test_cors_refuses_lookalike_origins(origin: str) -> None:
    assert CORS.headers(origin) == {}
    assert CORS.preflight_headers(origin) == {}


def test_cors_disabled_without_origins() -> None:
    cors = Cors([])
    assert not cors.enabled
    assert cors.headers("https://app.example.com") == {}


# -- JWT verification on JwtAuth directly --------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(header: Any, payload: bytes | Any, secret: bytes) -> str:
    """A hand-made HS256 token (any header, any payload bytes)."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(raw)}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def unsigned(header: Any, payload: Any) -> str:
    """An ``alg: none`` style token: header.payload. with an empty signature."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}."


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "u1", "exp": int(time.time()) + 300, **extra}


def verify_code(auth: JwtAuth, token: str) -> str:
    """The Unauthorized code ``verify`` raises ("ok" when it verifies)."""
    try:
        auth.verify(token)
    except Unauthorized as exc:
        assert exc.status == 401
        return exc.code
    return "ok"


@pytest.fixture
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(public: Any) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def test_jwt_verify_table(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text(f"# rotation\nk1 {SECRET}\nk2 {OTHER_SECRET}\n")
    auth = JwtAuth(
        load_config(
            None,
            overrides=[
                "auth.mode=jwt",
                f"auth.jwt.secret_file={secrets}",
                "auth.jwt.algorithms=['HS256', 'HS384']",
                "auth.jwt.audience=broker",
                "auth.jwt.issuer=https://app",
                "auth.jwt.leeway_seconds=5",
            ],
        )
    )
    now = int(time.time())
    good = claims(aud="broker", iss="https://app")
    k1, k2 = SECRET.encode(), OTHER_SECRET.encode()

    def enc(payload: dict[str, Any], key: bytes = k1, alg: str = "HS256", **hdr: Any) -> str:
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": "k1", **hdr})

    table = {
        "ok": (enc(good), "ok"),
        "ok_hs384": (enc(good, alg="HS384"), "ok"),
        "ok_k2": (enc(good, k2, kid="k2"), "ok"),
        "kid_selects": (enc(good, k2, kid="k1"), "bad_signature"),
        "no_kid_tries_all": (jwt.encode(good, k2, algorithm="HS256"), "ok"),
        "unknown_kid": (enc(good, kid="k3"), "unknown_kid"),
        "bad_signature": (enc(good, b"not-the-secret-" + b"x" * 64), "bad_signature"),
        "expired": (enc({**good, "exp": now - 30}), "token_expired"),
        "within_leeway": (enc({**good, "exp": now - 2}), "ok"),
        "missing_exp": (enc({k: v for k, v in good.items() if k != "exp"}), "bad_claims"),
        "wrong_aud": (enc({**good, "aud": "other"}), "bad_audience"),
        "missing_aud": (enc({k: v for k, v in good.items() if k != "aud"}), "bad_claims"),
        "wrong_iss": (enc({**good, "iss": "https://evil"}), "bad_issuer"),
        "hs512_not_allowed": (enc(good, alg="HS512"), "bad_algorithm"),
        "alg_none": (unsigned({"alg": "none", "typ": "JWT"}, good), "bad_algorithm"),
        "alg_none_signed": (hs256({"alg": "none"}, good, k1), "bad_algorithm"),
        "alg_None_case": (hs256({"alg": "None"}, good, k1), "bad_algorithm"),
        "alg_list": (hs256({"alg": ["HS256"]}, good, k1), "bad_algorithm"),
        "payload_list": (hs256({"alg": "HS256"}, b"[1, 2]", k1), "invalid_token"),
        "payload_not_json": (hs256({"alg": "HS256"}, b"{nope", k1), "invalid_token"),
        "header_list": (f"{b64(b'[1]')}.{b64(b'{}')}.{b64(b'sig')}", "malformed_token"),
        "empty": ("", "malformed_token"),
        "one_segment": ("abc", "malformed_token"),
        "two_segments": ("abc.def", "malformed_token"),
        "four_segments": (enc(good) + ".extra", "malformed_token"),
        "not_base64": ("!!!.@@@.###", "malformed_token"),
        "unicode": ("ü.ñ.€", "malformed_token"),
        "huge": ("a" * 100_000 + "." + "b" * 100_000 + ".c", "malformed_token"),
    }
    got = {name: verify_code(auth, token) for name, (token, _) in table.items()}
    assert got == {name: code for name, (_, code) in table.items()}


def test_jwt_public_keys_serve_only_their_family(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    keys = tmp_path / "keys.pem"
    keys.write_text(
        "kid: rsa1\n"
        + pem(rsa_key.public_key())
        + pem(ec_key.public_key())
        + pem(ed_key.public_key())
    )
    for allowed in (["RS256", "ES256", "EdDSA"], ["RS256", "ES256", "EdDSA", "HS256"]):
        sets = [
            "auth.mode=jwt",
            f"auth.jwt.public_key_file={keys}",
            f"auth.jwt.algorithms={allowed!r}",
        ]
        if "HS256" in allowed:
            sets.append(f"auth.jwt.secret={SECRET}")
        auth = JwtAuth(load_config(None, overrides=sets))
        assert verify_code(auth, jwt.encode(claims(), rsa_key, "RS256", {"kid": "rsa1"})) == "ok"
        assert verify_code(auth, jwt.encode(claims(), ec_key, "ES256")) == "ok"
        assert verify_code(auth, jwt.encode(claims(), ed_key, "EdDSA")) == "ok"
        # the RSA public key (as PEM text or DER) used as an HMAC secret
        public_pem = pem(rsa_key.public_key()).encode()
        want = "bad_signature" if "HS256" in allowed else "bad_algorithm"
        assert verify_code(auth, hs256({"alg": "HS256"}, claims(), public_pem)) == want
        assert verify_code(auth, hs256({"alg": "HS256", "kid": "rsa1"}, claims(), public_pem)) == (
            want if want == "bad_algorithm" else "bad_signature"
        )
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        assert verify_code(auth, jwt.encode(claims(), other, "RS256")) == "bad_signature"
        assert verify_code(auth, jwt.encode(claims(), rsa_key, "RS512")) == "bad_algorithm"


def test_load_keys_refuses_configs_without_a_usable_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys.pem"
    keys.write_text(pem(ed25519.Ed25519PrivateKey.generate().public_key()))
    cfg = load_config(
        None,
        overrides=[
            "auth.mode=jwt",
            f"auth.jwt.public_key_file={keys}",
            "auth.jwt.algorithms=['RS256']",
        ],
    )
    with pytest.raises(ConfigError, match="public_key_file"):
        load_keys(cfg.auth.jwt)


async def test_jwt_identity_claims_and_grants() -> None:
    cfg = load_config(
        None,
        overrides=[
            "auth.mode=jwt",
            f"auth.jwt.secret={SECRET}",
            "auth.jwt.user_claim=uid",
            "auth.jwt.tenant_claim=org",
            "auth.jwt.channels_claim=perms",
            "auth.grants=['user.{user}', 'tenant.{tenant}.*']",
        ],
    )
    auth = JwtAuth(cfg)
    exp = int(time.time()) + 60
    token = jwt.encode({"uid": 7, "org": 3, "perms": ["news", "room.{user}"], "exp": exp}, SECRET)
    identity = await auth.authenticate(Credentials(token=token), ("news",))
    assert (identity.user, identity.tenant, identity.expires_at) == ("7", "3", float(exp))
    for ok in ("news", "room.7", "user.7", "tenant.3.x"):
        assert identity.grants.allows(ok), ok
    for denied in ("room.8", "user.70", "tenant.4.x", "news2"):
        assert not identity.grants.allows(denied), denied
    assert await auth.authenticate(Credentials(), ("news",)) is ANONYMOUS
    for bad in ({"uid": True}, {"uid": 1.5}, {"uid": ""}, {"perms": "news"}, {"perms": [1]}):
        token = jwt.encode({"uid": "u", "exp": exp, **bad}, SECRET)
        with pytest.raises(Unauthorized) as exc:
            await auth.authenticate(Credentials(token=token), ("news",))
        assert exc.value.code == "bad_claims", bad


# Garbage that looks a little like a token (dots and base64 characters), and anything.
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="
garbage_tokens = st.one_of(
    st.text(max_size=300),
    st.lists(st.text(alphabet=B64, max_size=60), min_size=1, max_size=5).map(".".join),
    st.lists(
        st.binary(max_size=60).map(b64) | st.sampled_from(["", "e30", "W10", "bnVsbA", "eyJ9"]),
        min_size=2,
        max_size=4,
    ).map(".".join),
    st.builds(
        lambda h, p: f"{b64(json.dumps(h).encode())}.{b64(json.dumps(p).encode())}.sig",
        st.dictionaries(
            st.sampled_from(["alg", "kid", "typ", "crit", "jku", "x5u"]),
            st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.just("HS256"),
        ),
        st.recursive(st.none() | st.integers() | st.text(max_size=5), st.lists, max_leaves=5),
    ),
)


@functools.cache
def hs256_auth() -> JwtAuth:
    return JwtAuth(config())


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token=garbage_tokens)
def test_jwt_verify_never_accepts_or_crashes_on_garbage(token: str) -> None:
    auth = hs256_auth()
    with pytest.raises(Unauthorized) as exc:
        auth.verify(token)
    assert exc.value.status == 401


# Signed with the real secret: whatever an issuer puts in the claims is refused
# cleanly or accepted, never an exception other than Unauthorized (a 500).
claim_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
    st.lists(st.text(max_size=5) | st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.fixed_dictionaries(
        {},
        optional={
            "sub": claim_values,
            "tenant": claim_values,
            "channels": claim_values,
            "exp": claim_values | st.integers(min_value=int(time.time()) + 60, max_value=2**40),
            "nbf": claim_values,
            "iat": claim_values,
        },
    )
)
def test_jwt_authenticate_signed_odd_claims_never_crash(payload: dict[str, Any]) -> None:
    auth = hs256_auth()
    token = hs256({"alg": "HS256", "typ": "JWT"}, payload, SECRET.encode())
    try:
        identity = asyncio.run(auth.authenticate(Credentials(token=token), ("news",)))
    except Unauthorized:
        return
    assert isinstance(identity.expires_at, float)
    assert identity.user is None or isinstance(identity.user, str)


def test_jwt_signed_absurd_exp_is_refused_not_a_crash() -> None:
    """An issuer bug (``exp`` beyond float range) must give 401, never a 500."""
    auth = JwtAuth(config())
    token = hs256({"alg": "HS256"}, b'{"sub": "u1", "exp": 1' + b"0" * 400 + b"}", SECRET.encode())
    try:
        identity = asyncio.run(auth.authenticate(Credentials(token=token), ("news",)))
    except Unauthorized:
        return
    assert identity.expires_at is not None


def test_forwarding_headers_are_believed_only_from_a_trusted_proxy() -> None:
    req = request(
        "/e",
        {"Host": "sse.example.com", "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.com"},
    )
    untrusted = credentials(req, config(), "127.0.0.1", via_proxy=False)
    assert untrusted.forwarded_host is None  # the app gets the real Host instead
    assert untrusted.forwarded_for is not None and "6.6.6.6" not in untrusted.forwarded_for
    trusted = credentials(req, config(), "6.6.6.6", via_proxy=True)
    assert trusted.forwarded_host == "evil.com"
    assert trusted.forwarded_for is not None and trusted.forwarded_for.startswith("6.6.6.6")
