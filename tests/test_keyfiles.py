"""Key and secret files are read strictly: one grammar each, errors name key, file and line.

Tables over ``broker.keyfiles`` (pure), then the same files through the real
command line and real broker processes: a malformed file stops ``check-config``
and ``serve``, a SIGHUP with one keeps the old keys, and no message carries a
secret.
"""

from __future__ import annotations

import asyncio
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from conftest import StartBroker
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from helpers import eventually, get
from jwt.warnings import InsecureKeyLengthWarning
from test_cli import run_cli

from broker.config import config_warnings, load_config
from broker.errors import ConfigError
from broker.keyfiles import (
    Secret,
    parse_password,
    parse_public_keys,
    parse_secrets,
    parse_words,
    short_secret_warnings,
)
from broker.publish import load_publish_keys

SECRET = "keyfile-secret-" + "0123456789abcdef" * 3  # long enough: no warning
SECRET2 = "keyfile-rotated-" + "fedcba9876543210" * 3
KEY = "auth.jwt.secret_file"
PATH = "/etc/sse/jwt.secrets"


def pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def error_of(parse: Any, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(KEY, PATH, text)
    return info.value.message


# -- secrets files: "<secret>" or "<kid> <secret>" -----------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{SECRET}\n", [(1, None, SECRET)]),
        (f"k1 {SECRET}\n", [(1, "k1", SECRET)]),
        (f"k1 {SECRET}\nk2 {SECRET2}", [(1, "k1", SECRET), (2, "k2", SECRET2)]),
        (f"# rotation\n\n   \nk1 {SECRET}\n", [(4, "k1", SECRET)]),
        (f"  # indented comment\n\tk1\t{SECRET}  \r\n", [(2, "k1", SECRET)]),
        (f"{SECRET}\n{SECRET2}\n", [(1, None, SECRET), (2, None, SECRET2)]),
        (f"k1 {SECRET}\n{SECRET2}\n", [(1, "k1", SECRET), (2, None, SECRET2)]),
        ("k1 s3cr#t\n", [(1, "k1", "s3cr#t")]),  # '#' inside a word is just a character
    ],
)
def test_secret_lines_that_are_accepted(
    text: str, expected: list[tuple[int, str | None, str]]
) -> None:
    got = parse_secrets(KEY, PATH, text)
    assert [(s.line, s.kid, s.secret) for s in got] == expected


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        # the finding: an inline comment made "k2024" the secret, and it is in every header
        (f"k2024 {SECRET} # rotated 2024\n", 1, "comment"),
        (f"k2024 {SECRET} rotated\n", 1, "found 3 words"),
        (f"{SECRET} # note\n", 1, "comment"),  # else: kid = the secret, secret = "#"
        (f"k1 {SECRET} #\n", 1, "comment"),
        ("correct horse battery staple\n", 1, "found 4 words"),  # a secret with spaces
        (f"# ok\n\nk1 {SECRET}\nk2 {SECRET2} extra\n", 4, "found 3 words"),
        (f"k1 {SECRET}\nk1 {SECRET2}\n", 2, "kid 'k1' is already used on line 1"),
    ],
)
def test_secret_lines_that_stop_the_broker(text: str, line: int, needle: str) -> None:
    message = error_of(parse_secrets, text)
    assert message.startswith(f"{KEY}: {PATH} line {line}: "), message
    assert needle in message
    assert SECRET not in message and SECRET2 not in message
    assert "horse" not in message and "rotated" not in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "  \n# a\n#b\n"])
def test_a_secrets_file_without_a_secret_is_an_error(text: str) -> None:
    assert (
        error_of(parse_secrets, text) == f"{KEY}: {PATH} holds no secret (only blank or '#' lines)"
    )


def test_short_secrets_from_files_warn_naming_file_line_and_kid_never_the_secret() -> None:
    secrets = [Secret(3, "short-1", "k1"), Secret(4, SECRET, "k2"), Secret(6, "short-2", None)]
    assert short_secret_warnings(KEY, PATH, secrets) == [
        f"{KEY}: {PATH} line 3 (kid 'k1'): the secret is shorter than 32 bytes: "
        "too weak for HMAC signing",
        f"{KEY}: {PATH} line 6 (no kid): the secret is shorter than 32 bytes: "
        "too weak for HMAC signing",
    ]
    assert short_secret_warnings(KEY, PATH, [Secret(1, "é" * 16, None)]) == []  # 32 bytes


def test_config_warnings_cover_secret_file_lines(tmp_path: Path) -> None:
    secrets = tmp_path / "jwt.secrets"
    secrets.write_text(f"# rotation\nold tooshort\nnew {SECRET}\n")
    cfg = load_config(None, env={}, overrides=["auth.mode=jwt", f"auth.jwt.secret_file={secrets}"])
    short = [w for w in config_warnings(cfg) if "shorter than 32 bytes" in w]
    assert short == [
        f"auth.jwt.secret_file: {secrets} line 2 (kid 'old'): the secret is shorter than "
        "32 bytes: too weak for HMAC signing"
    ]
    # a malformed file is an error of its own (check_files); the warnings do not raise
    secrets.write_text("a b c\n")
    assert not any("secret_file" in w for w in config_warnings(cfg))


# -- publish.keys_file: one word per line ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k-1\n", ["k-1"]),
        ("from-file-1\n\n  from-file-2  \n", ["from-file-1", "from-file-2"]),
        ("# publishers\nk-1\n# retired: k-0\nk-2\r\n", ["k-1", "k-2"]),
    ],
)
def test_publish_key_lines_that_are_accepted(text: str, expected: list[str]) -> None:
    assert parse_words("publish.keys_file", PATH, text) == expected


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        (f"{SECRET} # ci\n", 1, "comment"),
        (f"k-1\nci {SECRET}\n", 2, "found 2 words"),
        (f"k-1\n\n{SECRET} {SECRET2} x\n", 3, "found 3 words"),
    ],
)
def test_publish_key_lines_that_stop_the_broker(text: str, line: int, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_words("publish.keys_file", PATH, text)
    message = info.value.message
    assert message.startswith(f"publish.keys_file: {PATH} line {line}: "), message
    assert needle in message and SECRET not in message and SECRET2 not in message


def test_an_empty_publish_keys_file_is_an_error_not_an_open_endpoint(tmp_path: Path) -> None:
    # No keys would leave /admin/disconnect without a bearer check.
    keys = tmp_path / "publish.keys"
    keys.write_text("# nobody yet\n")
    cfg = load_config(None, env={}, overrides=[f"publish.keys_file={keys}"])
    with pytest.raises(ConfigError, match=f"publish.keys_file: {keys} holds no key"):
        load_publish_keys(cfg)
    keys.write_text("k-1\nk-2\n")
    assert load_publish_keys(cfg) == ("k-1", "k-2")


# -- PEM public key files -------------------------------------------------------------------


RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256 = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()
PEM_RSA, PEM_P256, PEM_ED = pem(RSA), pem(P256), pem(ED)


def test_pem_files_that_are_accepted() -> None:
    text = (
        f"# production keys\n\nkid: rsa-2024\n{PEM_RSA}\n"
        f"kid:ec-1\n{PEM_P256}# no kid below\n{PEM_ED}"
    )
    got = parse_public_keys("auth.jwt.public_key_file", PATH, text)
    assert [(k.line, k.kid, type(k.key).__name__) for k in got] == [
        (4, "rsa-2024", type(RSA.public_key()).__name__),
        (15, "ec-1", type(P256.public_key()).__name__),
        (20, None, type(ED.public_key()).__name__),
    ]
    # indentation and CRLF line ends are tolerated inside and around blocks
    crlf = "kid: a\r\n" + "".join(f"  {line}\r\n" for line in PEM_P256.splitlines())
    (key,) = parse_public_keys("auth.jwt.public_key_file", PATH, crlf)
    assert (key.kid, key.line) == ("a", 2)


PRIVATE = P256.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
).decode()
BODY = PEM_P256.splitlines()


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        (f"{PEM_P256}stray text\n", 5, "unexpected text"),
        (f"hello\n{PEM_P256}", 1, "unexpected text"),
        (f"kid: a b\n{PEM_P256}", 1, 'expected "kid: <name>"'),
        ("kid:\n" + PEM_P256, 1, 'expected "kid: <name>"'),
        (f"kid: a # note\n{PEM_P256}", 1, 'expected "kid: <name>"'),
        (f"kid: a\n\n{PEM_P256}", 1, "'kid: a' must be directly followed"),
        (f"kid: a\n# c\n{PEM_P256}", 1, "'kid: a' must be directly followed"),
        (f"{PEM_P256}kid: last\n", 5, "'kid: last' must be directly followed"),
        (f"kid: a\n{PEM_P256}kid: a\n{PEM_RSA}", 6, "kid 'a' is already used on line 1"),
        ("\n".join(BODY[:-1]) + "\n", 1, "without -----END PUBLIC KEY-----"),
        ("\n".join(BODY[:-1]) + "\n" + PEM_RSA, 1, "without -----END PUBLIC KEY-----"),
        ("\n".join([BODY[0], "AAAA" + BODY[1][4:], *BODY[2:]]) + "\n", 1, "bad PEM key"),
        ("# x\n" + PRIVATE, 2, "a PRIVATE KEY block; only -----BEGIN PUBLIC KEY-----"),
        ("-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n", 1, "CERTIFICATE"),
        ("", 0, "holds no -----BEGIN PUBLIC KEY----- block"),
        ("# keys go here\n", 0, "holds no -----BEGIN PUBLIC KEY----- block"),
    ],
)
def test_pem_files_that_stop_the_broker(text: str, line: int, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_public_keys("auth.jwt.public_key_file", PATH, text)
    message = info.value.message
    where = f"auth.jwt.public_key_file: {PATH}" + (f" line {line}: " if line else " ")
    assert message.startswith(where), message
    assert needle in message, message
    assert PRIVATE.splitlines()[1] not in message  # never the text of a line


# -- redis.password_file: exactly one non-empty line ---------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hunter2\n", "hunter2"),
        ("hunter2", "hunter2"),
        ("\n  hunter2  \r\n\n", "hunter2"),
        ("#hunter2\n", "#hunter2"),  # a password may start with '#'
        ("two words\n", "two words"),
    ],
)
def test_password_files_that_are_accepted(text: str, expected: str) -> None:
    assert parse_password("redis.password_file", PATH, text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", f"redis.password_file: {PATH} is empty"),
        ("\n \n", f"redis.password_file: {PATH} is empty"),
        ("hunter2\nhunter3\n", f"redis.password_file: {PATH} line 2: a second non-empty line"),
        ("\nhunter2\n\n# rotated\n", f"redis.password_file: {PATH} line 4: a second"),
    ],
)
def test_password_files_that_stop_the_broker(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_password("redis.password_file", PATH, text)
    assert info.value.message.startswith(needle), info.value.message
    assert "hunter" not in info.value.message


# -- the command line and real brokers ------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "text", "line"),
    [
        ("auth.jwt.secret_file", f"k2024 {SECRET} # rotated 2024\n", 1),
        ("auth.jwt.secret_file", f"# keys\nold {SECRET2}\nk2 {SECRET} {SECRET2}\n", 3),
        ("auth.jwt.public_key_file", f"kid: a\n{PEM_P256}{SECRET}\n", 6),
        ("publish.keys_file", f"ok-key\n{SECRET} # ci\n", 2),
        ("redis.password_file", f"{SECRET}\n{SECRET2}\n", 2),
    ],
)
def test_check_config_fails_naming_key_file_and_line_never_the_secret(
    tmp_path: Path, key: str, text: str, line: int
) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    sets = [f"{key}={path}"]
    if key == "auth.jwt.secret_file":
        sets.append("auth.mode=jwt")
    elif key == "auth.jwt.public_key_file":
        sets += ["auth.mode=jwt", "auth.jwt.algorithms=['ES256']"]
    config = tmp_path / "broker.toml"
    config.write_text("")
    result = run_cli("check-config", str(config), *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"sse-broker: error: {key}: {path} line {line}: " in result.stderr, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert SECRET2 not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_warns_about_short_secrets_in_the_secret_file(tmp_path: Path) -> None:
    secrets = tmp_path / "jwt.secrets"
    secrets.write_text(f"new {SECRET}\nold sh0rt-S3CRET\n")
    config = tmp_path / "broker.toml"
    config.write_text(f'[auth]\nmode = "jwt"\n[auth.jwt]\nsecret_file = "{secrets}"\n')
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert (
        f"warning: auth.jwt.secret_file: {secrets} line 2 (kid 'old'): the secret is shorter "
        "than 32 bytes" in result.stderr
    )
    assert "sh0rt-S3CRET" not in result.stdout + result.stderr


def forge(secret: str, kid: str | None = None) -> str:
    claims = {
        "sub": "attacker",
        "tenant": "victim",
        "channels": ["*"],
        "exp": int(time.time()) + 300,
    }
    with warnings.catch_warnings():  # the forger's secret is short on purpose
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": kid} if kid else None)


@pytest.mark.slow
async def test_attack_inline_comment_in_secret_file_stops_the_broker(
    start_broker: StartBroker, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Issue 10 finding 1: ``k2024 <secret> # rotated 2024`` was read as "no kid,
    secret = k2024" — a secret every token header shows. A token signed with it
    read another tenant's events. Now the broker does not start at all."""
    secrets = tmp_path / "jwt.secrets"
    secrets.write_text(f"k2024 {SECRET} # rotated 2024\n")
    broker = await start_broker("auth.mode=jwt", f"auth.jwt.secret_file={secrets}", wait_ready=None)
    try:
        code = await broker.wait_exit(timeout=10)
    except TimeoutError:
        await broker.wait_ready()
        # The kid is public (every token header carries it): sign with it.
        forged = {"Authorization": f"Bearer {forge('k2024', kid='k2024')}"}
        status, _, _ = await get(http, broker.events_url("orders.victim"), forged)
        pytest.fail(f"the broker started on a malformed secrets file; forged token: {status}")
    log = broker.log_text()
    assert code == 2, log
    assert f"auth.jwt.secret_file: {secrets} line 1: " in log, log
    assert SECRET not in log
    assert "Traceback" not in log


async def test_sighup_with_a_malformed_keys_file_keeps_the_old_keys(
    start_broker: StartBroker, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    secrets = tmp_path / "jwt.secrets"
    secrets.write_text(f"k1 {SECRET}\n")
    broker = await start_broker("auth.mode=jwt", f"auth.jwt.secret_file={secrets}")
    url = broker.events_url("news")
    good = {"Authorization": f"Bearer {forge(SECRET, kid='k1')}"}
    assert (await get(http, url, good))[0] == 200
    # the rotation a careless operator writes: a comment after the new secret
    secrets.write_text(f"k1 {SECRET}\nk2 {SECRET2} # added today\n")
    broker.signal(signal.SIGHUP)

    async def log() -> str:
        await asyncio.sleep(0)
        return broker.log_text()

    text = await eventually(log, lambda t: "new configuration rejected" in t)
    assert f"auth.jwt.secret_file: {secrets} line 2: " in text, text
    assert SECRET not in text and SECRET2 not in text
    # the old keys serve on; the half-written rotation key does not
    assert (await get(http, url, good))[0] == 200
    status, body, _ = await get(http, url, {"Authorization": f"Bearer {forge(SECRET2, 'k2')}"})
    assert (status, body["error"]) == (401, "unknown_kid"), body
    assert broker.returncode is None
