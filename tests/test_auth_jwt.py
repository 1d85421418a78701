"""``auth.mode = "jwt"`` end to end: real broker processes, real redis-server, real HTTP.

Every refusal must be a 401/403 JSON body (never a 500, never a crash: the
broker answers ``/healthz`` afterwards), counted in
``sse_broker_auth_failures_total{reason}``, and no token or cookie may ever
reach the broker's log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from conftest import REPO_ROOT, BrokerProcess, StartBroker
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from helpers import bearer, envelope, get, publish, stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sse_client import SSEClient

SECRET = "jwt-test-secret-" + "0123456789abcdef" * 4
SECRET2 = "jwt-test-rotated-" + "fedcba9876543210" * 4


# -- helpers -------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(
    key: Any = SECRET,
    alg: str = "HS256",
    *,
    kid: str | None = None,
    ttl: float = 300,
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {"sub": "u1", "exp": int(time.time() + ttl), **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def handmade(header: Any, payload: bytes | Any, secret: bytes | None) -> str:
    """Any header, any payload bytes, HS256-signed with ``secret`` (None: empty signature)."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(raw)}"
    if secret is None:
        return signing_input + "."
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def jwt_broker(start_broker: StartBroker, *sets: str) -> BrokerProcess:
    return await start_broker("auth.mode=jwt", f"auth.jwt.secret={SECRET}", *sets)


async def assert_alive(broker: BrokerProcess) -> None:
    assert broker.returncode is None, broker.log_text()
    assert await broker.get("/healthz", admin=False) == (200, '{"status":"ok"}')


async def failures(broker: BrokerProcess) -> Counter[str]:
    from helpers import parse_metrics

    text = await broker.metrics()
    return Counter(
        {
            s.labels["reason"]: int(s.value)
            for s in parse_metrics(text)
            if s.name == "sse_broker_auth_failures_total"
        }
    )


# -- credential sources and precedence -----------------------------------------------------


@pytest.mark.slow
async def test_each_credential_source_is_accepted(
    start_broker: StartBroker, redis_client: Any
) -> None:
    broker = await jwt_broker(start_broker)
    token = mint(channels=["news"])
    sources: list[tuple[dict[str, str] | None, dict[str, str]]] = [
        (bearer(token), {}),
        (None, {"token": token}),
        ({"Cookie": f"sse_token={token}"}, {}),
    ]
    for headers, params in sources:
        async with stream(broker, "news", headers=headers, **params) as s:
            await publish(redis_client, "news", envelope("hello"))
            assert (await s.next_event()).data == "hello"


async def test_renamed_query_param_and_cookie(start_broker: StartBroker) -> None:
    broker = await jwt_broker(start_broker, "auth.query_param=jwt", "auth.cookie=session_jwt")
    token = mint(channels=["news"])
    async with stream(broker, "news", jwt=token):
        pass
    async with stream(broker, "news", headers={"Cookie": f"session_jwt={token}"}):
        pass
    async with aiohttp.ClientSession() as http:
        # the default names are not read any more
        assert (await get(http, broker.events_url("news", token=token)))[0] == 401
        assert (await get(http, broker.events_url("news"), {"Cookie": f"sse_token={token}"}))[
            0
        ] == 401


PRECEDENCE = [
    # (Authorization, ?token=, cookie) -> status
    ("good", "bad", "bad", 200),
    ("bad", "good", "good", 401),  # the first present wins, even a bad one
    (None, "good", "bad", 200),
    (None, "bad", "good", 401),
    (None, None, "good", 200),
    (None, None, "bad", 401),
    ("basic", "good", None, 200),  # another scheme is not a credential source
    ("basic", None, None, 401),
    ("empty", None, "good", 200),  # "Bearer " with nothing after it is absent
]


@pytest.mark.slow
async def test_first_present_credential_wins(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await jwt_broker(start_broker)
    tokens = {"good": mint(channels=["news"]), "bad": mint(SECRET2, channels=["news"])}
    for bearer_tok, query_tok, cookie_tok, status in PRECEDENCE:
        headers: dict[str, str] = {}
        params: dict[str, str] = {}
        if bearer_tok == "basic":
            headers["Authorization"] = "Basic " + base64.b64encode(b"u:p").decode()
        elif bearer_tok == "empty":
            headers["Authorization"] = "Bearer "
        elif bearer_tok:
            headers.update(bearer(tokens[bearer_tok]))
        if query_tok:
            params["token"] = tokens[query_tok]
        if cookie_tok:
            headers["Cookie"] = f"sse_token={tokens[cookie_tok]}"
        got, body, _ = await get(http, broker.events_url("news", **params), headers)
        case = (bearer_tok, query_tok, cookie_tok)
        assert got == status, (case, body)
        if status == 401:
            assert body["error"] in ("bad_signature", "credentials_required"), (case, body)


# -- refusals: 401 JSON, counted, never a crash, never logged ------------------------------


@pytest.mark.slow
async def test_invalid_tokens_are_401_json_counted_and_never_logged(
    start_broker: StartBroker, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text(f"k1 {SECRET}\nk2 {SECRET2}\n")
    broker = await start_broker(
        "auth.mode=jwt",
        f"auth.jwt.secret_file={secrets}",
        "auth.jwt.algorithms=['HS256', 'HS384']",
        "auth.jwt.audience=sse",
        "auth.jwt.issuer=https://app.example.com",
        "auth.jwt.leeway_seconds=5",
        "log.level=debug",
    )
    canary = "CANARY" + uuid.uuid4().hex  # marks every token: grep the log for it
    base = {"aud": "sse", "iss": "https://app.example.com", "channels": ["news"], "jti": canary}
    now = int(time.time())
    k1 = SECRET.encode()
    cases: dict[str, tuple[str, str]] = {
        "bad_signature": (mint(b"x" * 64, kid="k1", **base), "bad_signature"),
        "other_rotation_key_for_kid": (mint(SECRET2, kid="k1", **base), "bad_signature"),
        "expired": (mint(kid="k1", ttl=-60, **base), "token_expired"),
        "missing_exp": (
            jwt.encode({"sub": "u1", **base}, SECRET, headers={"kid": "k1"}),
            "bad_claims",
        ),
        "alg_none": (
            handmade({"alg": "none", "typ": "JWT"}, {"exp": now + 60, **base}, None),
            "bad_algorithm",
        ),
        "alg_none_uppercase": (
            handmade({"alg": "NONE"}, {"exp": now + 60, **base}, None),
            "bad_algorithm",
        ),
        "alg_not_allowed": (mint(SECRET, "HS512", kid="k1", **base), "bad_algorithm"),
        "alg_rs256_on_hmac_broker": (
            handmade({"alg": "RS256", "kid": "k1"}, {"exp": now + 60, **base}, k1),
            "bad_algorithm",
        ),
        "wrong_aud": (mint(kid="k1", **{**base, "aud": "other"}), "bad_audience"),
        "wrong_iss": (mint(kid="k1", **{**base, "iss": "https://evil"}), "bad_issuer"),
        "missing_aud": (mint(kid="k1", **{**base, "aud": None}), "bad_claims"),
        "unknown_kid": (mint(kid="k9", **base), "unknown_kid"),
        "payload_not_object": (handmade({"alg": "HS256"}, [1, 2, canary], k1), "invalid_token"),
        "payload_not_json": (handmade({"alg": "HS256"}, canary.encode(), k1), "invalid_token"),
        "header_not_object": (f"{b64(b'[1]')}.{b64(canary.encode())}.x", "malformed_token"),
        "one_segment": (canary, "malformed_token"),
        "four_segments": (mint(kid="k1", **base) + "." + canary, "malformed_token"),
        "not_base64": (f"!!{canary}!!.@@.##", "malformed_token"),
        "huge": (canary + "A" * 6000 + ".B.C", "malformed_token"),
        "tenant_claim_object": (
            mint(kid="k1", **{**base, "sub": None, "tenant": {"a": 1}}),
            "bad_claims",
        ),
        "channels_not_list": (mint(kid="k1", **{**base, "channels": canary}), "bad_claims"),
    }
    expected: Counter[str] = Counter()
    for name, (token, code) in cases.items():
        sources = [
            (bearer(token), {}),
            ({}, {"token": token}),
            ({"Cookie": f"sse_token={token}"}, {}),
        ]
        for headers, params in sources:
            url = broker.events_url("news", **params)
            status, body, resp_headers = await get(http, url, headers)
            assert status == 401, (name, status, body)
            assert body["error"] == code, (name, body)
            assert isinstance(body["message"], str) and canary not in body["message"], body
            assert resp_headers["Content-Type"].startswith("application/json")
            assert resp_headers["WWW-Authenticate"].startswith("Bearer")
            expected[code] += 1
    # unicode through the query string and an empty bearer (falls through: no credentials)
    status, body, _ = await get(http, broker.events_url("news", token=f"ü{canary}€.ñ.✓"))
    assert (status, body["error"]) == (401, "malformed_token")
    expected["malformed_token"] += 1
    status, body, _ = await get(http, broker.events_url("news"), {"Authorization": "Bearer "})
    assert (status, body["error"]) == (401, "credentials_required")
    expected["credentials_required"] += 1
    # a good token, so a successful request is in the log too
    good = mint(kid="k1", **base)
    status, _, _ = await get(http, broker.events_url("news"), bearer(good))
    assert status == 200

    await assert_alive(broker)
    assert await failures(broker) == expected
    log = broker.log_path.read_text(errors="replace")
    assert canary not in log
    assert good not in log and SECRET not in log and SECRET2 not in log


async def test_oversized_credentials_are_refused_and_never_logged(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    """Past aiohttp's 8190-byte line limit the HTTP layer refuses the request;
    the refusal must not write the credential (or a prefix of it) to the log."""
    broker = await jwt_broker(start_broker)
    filler = "f" * 9000
    secrets: dict[str, str] = {}
    for where in ("bearer", "query", "cookie"):
        secret = secrets[where] = f"CANARY{where}{uuid.uuid4().hex}"  # sent first
        headers, params = {
            "bearer": ({"Authorization": f"Bearer {secret}.{filler}"}, {}),
            "query": ({}, {"token": f"{secret}.{filler}"}),
            "cookie": ({"Cookie": f"sse_token={secret}; filler={filler}"}, {}),
        }[where]
        status, _, _ = await get(http, broker.events_url("news", **params), headers)
        assert 400 <= status < 500, (where, status)
    await assert_alive(broker)
    log = broker.log_path.read_text(errors="replace")
    leaked = [where for where, secret in secrets.items() if secret in log]
    assert leaked == [], f"credentials in the broker log via: {leaked}"


async def test_leeway_is_honoured(start_broker: StartBroker, http: aiohttp.ClientSession) -> None:
    broker = await jwt_broker(start_broker, "auth.jwt.leeway_seconds=10")
    for ttl, status in [(-3, 200), (-8, 200), (-15, 401), (-60, 401)]:
        got, body, _ = await get(
            http, broker.events_url("news"), bearer(mint(ttl=ttl, channels=["news"]))
        )
        assert got == status, (ttl, body)


@pytest.mark.slow
async def test_token_within_leeway_still_ends_with_token_expired(
    start_broker: StartBroker,
) -> None:
    """A token accepted inside the leeway is already past ``exp``: the stream must
    tell the client why it ends (``broker.reconnect`` ``token_expired``)."""
    broker = await jwt_broker(start_broker, "auth.jwt.leeway_seconds=30")
    async with SSEClient.connect(
        broker.events_url("news"), headers=bearer(mint(ttl=-5, channels=["news"]))
    ) as s:
        assert s.status == 200
        assert await s.wait_closed(timeout=40), "the stream outlived exp + leeway"
        reconnects = [e for e in s.pending if e.type == "broker.reconnect"]
        assert [e.json()["reason"] for e in reconnects] == ["token_expired"], s.raw


# -- keys: public keys, confusion, rotation ------------------------------------------------


@pytest.mark.slow
async def test_rs256_es256_eddsa_public_keys(
    start_broker: StartBroker, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    keys = tmp_path / "keys.pem"
    keys.write_text(f"kid: rsa-2024\n{pem(rsa_key)}kid: ec-1\n{pem(ec_key)}{pem(ed_key)}")
    broker = await start_broker(
        "auth.mode=jwt",
        f"auth.jwt.public_key_file={keys}",
        "auth.jwt.algorithms=['RS256', 'ES256', 'EdDSA']",
    )
    url = broker.events_url("news")
    ok = [
        mint(rsa_key, "RS256", kid="rsa-2024", channels=["news"]),
        mint(rsa_key, "RS256", channels=["news"]),  # no kid: any key of the family
        mint(ec_key, "ES256", kid="ec-1", channels=["news"]),
        mint(ed_key, "EdDSA", channels=["news"]),
    ]
    # a kid naming no key falls back to the keys without one (the Ed25519 key here)
    ok.append(mint(ed_key, "EdDSA", kid="nope", channels=["news"]))
    for token in ok:
        assert (await get(http, url, bearer(token)))[0] == 200, jwt.get_unverified_header(token)
    public_pem = pem(rsa_key).encode()
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = {
        # HS/RS confusion: the RSA public key (which attackers know) as an HMAC secret
        "hs256_with_public_key": (
            handmade(
                {"alg": "HS256", "typ": "JWT"},
                {"sub": "u1", "exp": int(time.time()) + 60, "channels": ["news"]},
                public_pem,
            ),
            "bad_algorithm",
        ),
        "hs256_with_public_key_and_kid": (
            handmade(
                {"alg": "HS256", "kid": "rsa-2024"},
                {"sub": "u1", "exp": int(time.time()) + 60},
                public_pem,
            ),
            "bad_algorithm",
        ),
        "other_rsa_key": (mint(other_rsa, "RS256", channels=["news"]), "bad_signature"),
        "other_rsa_key_claiming_kid": (
            mint(other_rsa, "RS256", kid="rsa-2024", channels=["news"]),
            "bad_signature",
        ),
        "rs512_not_allowed": (mint(rsa_key, "RS512", channels=["news"]), "bad_algorithm"),
        "ps256_not_allowed": (mint(rsa_key, "PS256", channels=["news"]), "bad_algorithm"),
        # the kid names a key of another family: no EC key carries it
        "ec_token_claiming_rsa_kid": (
            mint(ec_key, "ES256", kid="rsa-2024", channels=["news"]),
            "unknown_kid",
        ),
        "eddsa_other_key": (
            mint(ed25519.Ed25519PrivateKey.generate(), "EdDSA", channels=["news"]),
            "bad_signature",
        ),
        "es256_other_key": (
            mint(ec.generate_private_key(ec.SECP256R1()), "ES256", channels=["news"]),
            "bad_signature",
        ),
        # "psychic signature" (r = s = 0) and an empty signature
        "es256_zero_signature": (
            mint(ec_key, "ES256", channels=["news"]).rsplit(".", 1)[0] + "." + b64(bytes(64)),
            "bad_signature",
        ),
        "rs256_empty_signature": (
            mint(rsa_key, "RS256", channels=["news"]).rsplit(".", 1)[0] + ".",
            "bad_signature",
        ),
        # the attacker's own key embedded in the header must not be used
        "embedded_jwk": (
            jwt.encode(
                {"sub": "u1", "exp": int(time.time()) + 60, "channels": ["news"]},
                other_rsa,
                algorithm="RS256",
                headers={
                    "jwk": jwt.algorithms.RSAAlgorithm.to_jwk(other_rsa.public_key(), as_dict=True)
                },
            ),
            "bad_signature",
        ),
        "jku_header": (
            jwt.encode(
                {"sub": "u1", "exp": int(time.time()) + 60, "channels": ["news"]},
                other_rsa,
                algorithm="RS256",
                headers={"jku": "http://127.0.0.1:1/keys", "x5u": "http://127.0.0.1:1/x5"},
            ),
            "bad_signature",
        ),
        "rs256_unknown_kid": (mint(rsa_key, "RS256", kid="nope", channels=["news"]), "unknown_kid"),
    }
    for name, (token, code) in refused.items():
        status, body, _ = await get(http, url, bearer(token))
        assert status == 401, (name, body)
        assert body["error"] == code, (name, body)
    await assert_alive(broker)


async def test_hs_rs_confusion_with_both_families_allowed(
    start_broker: StartBroker, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = tmp_path / "keys.pem"
    keys.write_text(pem(rsa_key))
    broker = await start_broker(
        "auth.mode=jwt",
        f"auth.jwt.secret={SECRET}",
        f"auth.jwt.public_key_file={keys}",
        "auth.jwt.algorithms=['HS256', 'RS256']",
    )
    url = broker.events_url("news")
    assert (await get(http, url, bearer(mint(channels=["news"]))))[0] == 200
    assert (await get(http, url, bearer(mint(rsa_key, "RS256", channels=["news"]))))[0] == 200
    claims = {"sub": "u1", "exp": int(time.time()) + 60, "channels": ["news"]}
    public_pem = pem(rsa_key).encode()
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (public_pem, public_pem.strip(), der):
        token = handmade({"alg": "HS256"}, claims, secret)
        status, body, _ = await get(http, url, bearer(token))
        assert (status, body["error"]) == (401, "bad_signature"), body
    # an RS256 header over an HMAC signature
    status, body, _ = await get(
        http, url, bearer(handmade({"alg": "RS256"}, claims, SECRET.encode()))
    )
    assert status == 401, body
    await assert_alive(broker)


async def test_secret_rotation_kid_selects_and_keyless_tries_all(
    start_broker: StartBroker, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text(f"old {SECRET}\nnew {SECRET2}\n")
    broker = await start_broker("auth.mode=jwt", f"auth.jwt.secret_file={secrets}")
    url = broker.events_url("news")
    cases = [
        (mint(SECRET, kid="old", channels=["news"]), 200, None),
        (mint(SECRET2, kid="new", channels=["news"]), 200, None),
        (mint(SECRET, channels=["news"]), 200, None),
        (mint(SECRET2, channels=["news"]), 200, None),
        (mint(SECRET2, kid="old", channels=["news"]), 401, "bad_signature"),
        (mint(SECRET, kid="new", channels=["news"]), 401, "bad_signature"),
        (mint(SECRET, kid="gone", channels=["news"]), 401, "unknown_kid"),
        (mint(b"z" * 64, channels=["news"]), 401, "bad_signature"),
    ]
    for token, status, code in cases:
        got, body, _ = await get(http, url, bearer(token))
        assert got == status, (jwt.get_unverified_header(token), body)
        if code:
            assert body["error"] == code, body


async def test_keyless_secret_lines_rotate_too(
    start_broker: StartBroker, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text(f"# comment\n\n{SECRET}\n{SECRET2}\n")
    broker = await start_broker("auth.mode=jwt", f"auth.jwt.secret_file={secrets}")
    url = broker.events_url("news")
    assert (await get(http, url, bearer(mint(SECRET, channels=["news"]))))[0] == 200
    assert (await get(http, url, bearer(mint(SECRET2, channels=["news"]))))[0] == 200
    # a kid naming no key falls back to the keys without kid
    assert (await get(http, url, bearer(mint(SECRET2, kid="x", channels=["news"]))))[0] == 200
    assert (await get(http, url, bearer(mint(b"q" * 64, channels=["news"]))))[0] == 401


# -- EC curves: each key verifies only its curve's algorithm (issue 10 finding 3) ----------


ES_SETS = ("auth.mode=jwt", "auth.jwt.algorithms=['ES256', 'ES384']")


async def test_attack_es384_token_on_a_p256_broker_is_401_json_not_500(
    start_broker: StartBroker, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """PyJWT's InvalidKeyError (a P-256 key asked to verify ES384) is no
    InvalidTokenError: it escaped as a 500 with a traceback."""
    p256 = ec.generate_private_key(ec.SECP256R1())
    keys = tmp_path / "keys.pem"
    keys.write_text(f"kid: p256\n{pem(p256)}")
    broker = await start_broker(*ES_SETS, f"auth.jwt.public_key_file={keys}")
    url = broker.events_url("news")
    assert (await get(http, url, bearer(mint(p256, "ES256", channels=["news"]))))[0] == 200
    attacker = ec.generate_private_key(ec.SECP384R1())
    for token in (
        mint(attacker, "ES384", channels=["news"]),
        mint(attacker, "ES384", kid="p256", channels=["news"]),  # the kid of the P-256 key
        # the P-256 key's own valid signature under an ES384 header
        ".".join([b64(b'{"alg":"ES384"}'), *mint(p256, "ES256").split(".")[1:]]),
    ):
        status, body, headers = await get(http, url, bearer(token))
        assert status == 401, (jwt.get_unverified_header(token), body)
        assert body["error"] == "bad_algorithm", body
        assert "ES384" in body["message"]
        assert headers["Content-Type"].startswith("application/json")
    await assert_alive(broker)
    assert (await failures(broker))["bad_algorithm"] == 3
    log = broker.log_text()
    assert "Traceback" not in log and "InvalidKeyError" not in log, log


async def test_key_rotation_across_curves_accepts_both(
    start_broker: StartBroker, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    old = ec.generate_private_key(ec.SECP256R1())
    new = ec.generate_private_key(ec.SECP384R1())
    keys = tmp_path / "keys.pem"
    keys.write_text(f"kid: a\n{pem(old)}\nkid: b\n{pem(new)}")
    broker = await start_broker(*ES_SETS, f"auth.jwt.public_key_file={keys}")
    url = broker.events_url("news")
    accepted = [
        mint(old, "ES256", kid="a", channels=["news"]),
        mint(new, "ES384", kid="b", channels=["news"]),
        mint(old, "ES256", channels=["news"]),
        # no kid: only the P-384 key is tried (before, the P-256 key came first: a 500)
        mint(new, "ES384", channels=["news"]),
    ]
    for token in accepted:
        status, body, _ = await get(http, url, bearer(token))
        assert status == 200, (jwt.get_unverified_header(token), body)
    refused = {
        # a kid of the other curve names no key of this algorithm
        "es384_with_kid_a": (mint(new, "ES384", kid="a", channels=["news"]), "unknown_kid"),
        "es256_with_kid_b": (mint(old, "ES256", kid="b", channels=["news"]), "unknown_kid"),
        "es384_other_key": (
            mint(ec.generate_private_key(ec.SECP384R1()), "ES384", channels=["news"]),
            "bad_signature",
        ),
        "es512_not_accepted": (
            mint(ec.generate_private_key(ec.SECP521R1()), "ES512", channels=["news"]),
            "bad_algorithm",
        ),
    }
    for name, (token, code) in refused.items():
        status, body, _ = await get(http, url, bearer(token))
        assert (status, body["error"]) == (401, code), (name, body)
    await assert_alive(broker)
    assert "Traceback" not in broker.log_text()


async def test_a_key_on_a_curve_without_an_algorithm_stops_the_broker(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.pem"
    keys.write_text(f"kid: a\n{pem(ec.generate_private_key(ec.SECP256R1()))}")
    keys.write_text(keys.read_text() + f"kid: k1\n{pem(ec.generate_private_key(ec.SECP256K1()))}")
    broker = await start_broker(*ES_SETS, f"auth.jwt.public_key_file={keys}", wait_ready=None)
    assert await broker.wait_exit() == 2, broker.log_text()
    assert f"auth.jwt.public_key_file: {keys} line 7: EC curve secp256k1" in broker.log_text()


def test_load_keys_ties_each_ec_key_to_its_curve(tmp_path: Path) -> None:
    from broker.auth.jwt import load_keys
    from broker.config import load_config

    curves = [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()]
    keys = tmp_path / "keys.pem"
    keys.write_text("".join(pem(ec.generate_private_key(c)) for c in curves))
    cfg = load_config(
        None,
        env={},
        overrides=[
            "auth.mode=jwt",
            f"auth.jwt.public_key_file={keys}",
            "auth.jwt.algorithms=['ES256', 'ES384', 'ES512']",
        ],
    )
    assert [sorted(k.algorithms) for k in load_keys(cfg.auth.jwt)] == [
        ["ES256"],
        ["ES384"],
        ["ES512"],
    ]


def test_every_pyjwt_error_is_unauthorized(tmp_path: Path) -> None:
    """Whatever PyJWT raises for a token — InvalidKeyError included — verify
    answers Unauthorized (401): a key of the wrong curve is never tried, and
    the PyJWT error root is caught around the header and the decode."""
    from broker.auth.jwt import JwtAuth
    from broker.config import load_config
    from broker.errors import Unauthorized

    p256, p384 = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    keys = tmp_path / "keys.pem"
    keys.write_text(pem(p256) + pem(p384) + pem(rsa_key) + pem(ed_key))
    auth = JwtAuth(
        load_config(
            None,
            env={},
            overrides=[
                "auth.mode=jwt",
                f"auth.jwt.public_key_file={keys}",
                f"auth.jwt.secret={SECRET}",
                "auth.jwt.algorithms=['HS256', 'RS256', 'PS256', 'ES256', 'ES384', 'ES512', "
                "'EdDSA']",
            ],
        )
    )
    signers: list[tuple[Any, str]] = [
        (SECRET, "HS256"),
        (rsa_key, "RS256"),
        (rsa_key, "PS256"),
        (p256, "ES256"),
        (p384, "ES384"),
        (ed_key, "EdDSA"),
    ]
    claims = {"sub": "u1", "exp": int(time.time()) + 60}
    signed = {alg: jwt.encode(claims, key, algorithm=alg) for key, alg in signers}
    codes: dict[tuple[str, str], str] = {}
    for alg, token in signed.items():
        assert auth.verify(token)["sub"] == "u1", alg
        _, body, sig = token.split(".")
        # every accepted alg over every other signature: wrong length, wrong family
        for other in ("HS256", "RS256", "PS256", "ES256", "ES384", "ES512", "EdDSA"):
            if other == alg:
                continue
            forged = f"{b64(json.dumps({'alg': other}).encode())}.{body}.{sig}"
            try:
                auth.verify(forged)
            except Unauthorized as exc:
                assert exc.status == 401
                codes[alg, other] = exc.code
    assert set(codes.values()) <= {"bad_signature", "bad_algorithm"}, codes
    assert len(codes) == 6 * 6


# -- claims, grants, placeholders ----------------------------------------------------------


async def test_claim_names_are_configurable(
    start_broker: StartBroker, redis_client: Any, http: aiohttp.ClientSession
) -> None:
    broker = await jwt_broker(
        start_broker,
        "auth.jwt.user_claim=uid",
        "auth.jwt.tenant_claim=org",
        "auth.jwt.channels_claim=perms",
    )
    token = mint(sub=None, uid=7, org=3, perms=["feed"])
    async with stream(broker, "feed", headers=bearer(token)) as s:
        await publish(redis_client, "feed", envelope("not-me", users=[8]))
        await publish(redis_client, "feed", envelope("other-org", tenant=4))
        await publish(redis_client, "feed", envelope("mine", users=[7], tenant=3))
        await publish(redis_client, "feed", envelope("org", tenant="3"))
        assert [e.data for e in await s.events(2)] == ["mine", "org"]
    # the default claim names mean nothing now
    old_style = mint(sub="u1", tenant="t1", channels=["feed"])
    status, body, _ = await get(http, broker.events_url("feed"), bearer(old_style))
    assert (status, body["error"]) == (403, "channel_forbidden")


async def test_integer_sub_claim_from_php_is_accepted(
    start_broker: StartBroker, redis_client: Any
) -> None:
    """PHP apps mint ``'sub' => $user->id`` (an int); ids compare as decimal strings."""
    broker = await jwt_broker(start_broker)
    async with stream(broker, "feed", headers=bearer(mint(sub=42, channels=["feed"]))) as s:
        await publish(redis_client, "feed", envelope("for 42", users=[42]))
        assert (await s.next_event()).data == "for 42"


async def test_ungranted_channel_is_403_naming_it(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await jwt_broker(start_broker)
    token = mint(channels=["news", "orders.*"])
    assert (await get(http, broker.events_url("news", "orders.7"), bearer(token)))[0] == 200
    for channels, named in [
        (("news", "secret"), "secret"),
        (("orders", "news"), "orders"),
        (("orders.7", "private-orders.7"), "private-orders.7"),
    ]:
        status, body, headers = await get(http, broker.events_url(*channels), bearer(token))
        assert status == 403, body
        assert body["error"] == "channel_forbidden"
        assert repr(named) in body["message"], body
        assert headers["Content-Type"].startswith("application/json")
    assert (await failures(broker))["channel_forbidden"] == 3


@pytest.mark.slow
async def test_grants_from_token_and_config_with_placeholders(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await jwt_broker(
        start_broker, "auth.grants=['tenant.{tenant}.*', 'user.{user}', 'app.status']"
    )
    token = mint(sub="u1", tenant="t1", channels=["news", "room.{user}"])
    allowed = ["news", "app.status", "tenant.t1.orders", "tenant.t1.a.b", "user.u1", "room.u1"]
    denied = ["tenant.t2.orders", "tenant.t1", "user.u2", "user.u1.x", "room.u2", "news.x"]
    for channel in allowed:
        assert (await get(http, broker.events_url(channel), bearer(token)))[0] == 200, channel
    for channel in denied:
        status, body, _ = await get(http, broker.events_url(channel), bearer(token))
        assert status == 403, (channel, body)
    # no tenant claim: the tenant grant drops out instead of becoming "tenant..*"
    no_tenant = mint(sub="u1")
    for channel in ["tenant..x", "tenant.t1.x"]:
        assert (await get(http, broker.events_url(channel), bearer(no_tenant)))[0] == 403
    assert (await get(http, broker.events_url("user.u1"), bearer(no_tenant)))[0] == 200


INJECTION_IDS = ["*", "a*", "?", "??", "[x]", "[!z]", ".", "user.*", "*.*", "u1*", "[u]1"]


@pytest.mark.slow
async def test_placeholder_injection_does_not_widen_grants(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await jwt_broker(start_broker, "auth.grants=['user.{user}', 'tenant.{tenant}.*']")
    victims = ["user.u1", "user.a", "user.ab", "user.x", "user..", "user.user.u1", "user.u1x"]
    victims += ["tenant.t1.orders", "tenant.a.x", "tenant..x", "tenant.user.x.y"]
    for evil in INJECTION_IDS:
        token = mint(sub=evil, tenant=evil)
        for channel in victims:
            if channel == f"user.{evil}":
                continue  # their own channel, literally
            status, body, _ = await get(http, broker.events_url(channel), bearer(token))
            assert status == 403, (evil, channel, body)
    # the literal channel is still theirs
    assert (await get(http, broker.events_url("user.."), bearer(mint(sub="."))))[0] == 200


@pytest.mark.slow
async def test_public_channels_without_token_never_private_or_presence(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await jwt_broker(start_broker, "auth.public_channels=['*']")
    assert (await get(http, broker.events_url("status", "board.1")))[0] == 200
    for channel in ["private-orders.1", "presence-room.1", "private-", "presence-x"]:
        status, body, _ = await get(http, broker.events_url("status", channel))
        assert (status, body["error"]) == (401, "credentials_required"), channel
        assert repr(channel) in body["message"]
        # a token that does not grant it: 403
        status, body, _ = await get(http, broker.events_url(channel), bearer(mint()))
        assert status == 403, (channel, body)
    # a token that grants it: fine
    token = mint(channels=["private-orders.*"])
    assert (await get(http, broker.events_url("private-orders.1", "status"), bearer(token)))[
        0
    ] == 200


@pytest.mark.slow
async def test_default_jwt_mode_has_no_public_channels(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await jwt_broker(start_broker)
    status, body, _ = await get(http, broker.events_url("status"))
    assert (status, body["error"]) == (401, "credentials_required")


# -- expiry during a stream ----------------------------------------------------------------


@pytest.mark.slow
async def test_token_expiry_ends_stream_with_token_expired(
    start_broker: StartBroker, redis_client: Any
) -> None:
    broker = await jwt_broker(start_broker, "auth.jwt.leeway_seconds=0")
    exp = int(time.time()) + 2
    short = jwt.encode({"sub": "u1", "exp": exp, "channels": ["news"]}, SECRET)
    long = mint(channels=["news"])
    async with (
        stream(broker, "news", headers=bearer(short)) as s,
        stream(broker, "news", headers=bearer(long)) as keeper,
    ):
        await publish(redis_client, "news", envelope("before"))
        assert (await s.next_event()).data == "before"
        assert (await keeper.next_event()).data == "before"
        event = await s.next_event(timeout=6)
        closed_at = time.time()
        assert event.type == "broker.reconnect"
        assert event.json()["reason"] == "token_expired"
        assert event.json()["retry_ms"] > 0
        assert exp - 0.5 <= closed_at <= exp + 4
        assert await s.wait_closed(timeout=3)
        # the other stream lives on
        await publish(redis_client, "news", envelope("after"))
        assert (await keeper.next_event()).data == "after"
    assert (
        await broker.metric("sse_broker_connections_closed_total", {"reason": "token_expired"}) == 1
    )


# -- the CLI -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_cli_token_verifies_and_grants_what_it_says(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    sets = ["auth.mode=jwt", f"auth.jwt.secret={SECRET}", "auth.jwt.audience=sse"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_BROKER_")}
    argv = [sys.executable, "-m", "broker", "token", "--user", "u9", "--tenant", "t9"]
    argv += ["--channel", "orders.*", "--channel", "news", "--ttl", "120"]
    for item in sets:
        argv += ["--set", item]
    result = subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="sse")
    assert claims["sub"] == "u9" and claims["tenant"] == "t9"
    assert claims["channels"] == ["orders.*", "news"]
    assert 110 <= claims["exp"] - time.time() <= 121
    broker = await start_broker(*sets)
    for channel in ["orders.1", "news"]:
        assert (await get(http, broker.events_url(channel), bearer(token)))[0] == 200
    assert (await get(http, broker.events_url("billing"), bearer(token)))[0] == 403
    assert SECRET not in result.stdout + result.stderr


# -- robustness: garbage over HTTP, and signed nonsense ------------------------------------


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
garbage = st.one_of(
    st.text(min_size=1, max_size=200),
    st.lists(st.text(alphabet=B64, max_size=40), min_size=1, max_size=5).map(".".join),
    st.lists(st.binary(max_size=40).map(b64), min_size=3, max_size=3).map(".".join),
)


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(token=garbage, how=st.sampled_from(["bearer", "query", "cookie"]))
async def test_garbage_tokens_are_401_never_500(
    start_broker: StartBroker, http: aiohttp.ClientSession, token: str, how: str
) -> None:
    broker = await shared_broker(start_broker)
    headers: dict[str, str] = {}
    params: dict[str, str] = {}
    if how == "bearer" and token.isascii() and token.isprintable():
        headers = bearer(token)
    elif how == "cookie" and all(c in B64 + "." for c in token):
        headers = {"Cookie": f"sse_token={token}"}
    else:
        params = {"token": token}
    status, body, _ = await get(http, broker.events_url("news", **params), headers)
    assert status == 401, (token, body)
    assert body["error"] in {
        "malformed_token",
        "bad_algorithm",
        "unknown_kid",
        "invalid_token",
        "bad_signature",
        "credentials_required",
    }, body
    assert broker.returncode is None


_SHARED: dict[int, BrokerProcess] = {}


async def shared_broker(start_broker: StartBroker) -> BrokerProcess:
    """One broker for every hypothesis example of a test (keyed by the fixture instance)."""
    key = id(start_broker)
    if key not in _SHARED or _SHARED[key].returncode is not None:
        _SHARED.clear()
        _SHARED[key] = await jwt_broker(start_broker)
    return _SHARED[key]


async def test_signed_token_with_absurd_exp_is_401_not_500(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    """An issuer bug (``exp`` beyond float range) must not crash the request."""
    broker = await jwt_broker(start_broker)
    payload = b'{"sub": "u1", "channels": ["news"], "exp": 1' + b"0" * 400 + b"}"
    token = handmade({"alg": "HS256", "typ": "JWT"}, payload, SECRET.encode())
    status, body, _ = await get(http, broker.events_url("news"), bearer(token))
    assert status in (200, 401), (status, body)
    await assert_alive(broker)
