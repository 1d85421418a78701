"""Strict readers for the files that hold secrets and keys (pure: text in, values out).

One grammar per file kind, and anything outside it is a ConfigError naming the
config key, the file and the line — never the line's text, which may hold a
secret. Lenient parsing is what made ``<kid> <secret> # rotated`` a key whose
"secret" was the kid every token header shows; so nothing here guesses.

- secrets (``auth.jwt.secret_file``): ``<secret>`` or ``<kid> <secret>`` per line;
- single words (``publish.keys_file``): ``<key>`` per line;
- PEM public keys (``auth.jwt.public_key_file``): ``-----BEGIN PUBLIC KEY-----``
  blocks, each optionally preceded directly by a ``kid: <name>`` line;
- a password (``redis.password_file``): exactly one non-empty line.

In the first three, blank lines and lines starting with ``#`` are ignored; a
word starting with ``#`` anywhere else is an error (no inline comments).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker.errors import ConfigError

MIN_HMAC_SECRET_BYTES = 32

# The JWT algorithms, by the kind of key that verifies them: a secret only
# HS*, a public key only its own family's (an EC key only its curve's ES*).
# One list for the config check (``auth.jwt.algorithms``) and the verifier.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = ("ES256", "ES384", "ES512")
ED_ALGORITHMS = ("EdDSA",)
JWT_ALGORITHMS = (*HMAC_ALGORITHMS, *RSA_ALGORITHMS, *EC_ALGORITHMS, *ED_ALGORITHMS)

_BEGIN = "-----BEGIN PUBLIC KEY-----"
_END = "-----END PUBLIC KEY-----"
_ANY_BEGIN = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")
_KID = re.compile(r"kid:(.*)")


@dataclass(frozen=True, slots=True)
class Secret:
    line: int
    secret: str = field(repr=False)
    kid: str | None = None


@dataclass(frozen=True, slots=True)
class PublicKey:
    line: int  # of the BEGIN line
    key: Any  # a cryptography public key
    kid: str | None = None


def _where(key: str, path: str, line: int) -> str:
    return f"{key}: {path} line {line}"


def _content_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, words) of every line that is neither blank nor a comment."""
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if words and not words[0].startswith("#"):
            yield number, words


def _no_inline_comment(key: str, path: str, number: int, words: list[str]) -> None:
    # "<secret> # note" would otherwise read as kid = the secret, secret = "#".
    if any(w.startswith("#") for w in words):
        raise ConfigError(
            f"{_where(key, path, number)}: a '#' starts a comment only at the start of a "
            "line; put the comment on a line of its own"
        )


def parse_secrets(key: str, path: str, text: str) -> list[Secret]:
    """Every secret of a secrets file, in file order; at least one.

    Raises ConfigError naming the line for anything but ``<secret>`` or
    ``<kid> <secret>``, and for a kid used twice.
    """
    secrets: list[Secret] = []
    kids: dict[str, int] = {}
    for number, words in _content_lines(text):
        _no_inline_comment(key, path, number, words)
        if len(words) > 2:
            raise ConfigError(
                f'{_where(key, path, number)}: expected "<secret>" or "<kid> <secret>", '
                f"found {len(words)} words (a secret cannot contain spaces)"
            )
        kid = words[0] if len(words) == 2 else None
        if kid is not None:
            if kid in kids:
                raise ConfigError(
                    f"{_where(key, path, number)}: kid {kid!r} is already used on line {kids[kid]}"
                )
            kids[kid] = number
        secrets.append(Secret(number, words[-1], kid))
    if not secrets:
        raise ConfigError(f"{key}: {path} holds no secret (only blank or '#' lines)")
    return secrets


def parse_words(key: str, path: str, text: str) -> list[str]:
    """One word per non-blank, non-comment line (``publish.keys_file``); at least one."""
    words_out: list[str] = []
    for number, words in _content_lines(text):
        _no_inline_comment(key, path, number, words)
        if len(words) != 1:
            raise ConfigError(
                f"{_where(key, path, number)}: expected one key per line, found "
                f"{len(words)} words (a key cannot contain spaces)"
            )
        words_out.append(words[0])
    if not words_out:
        raise ConfigError(f"{key}: {path} holds no key (only blank or '#' lines)")
    return words_out


def parse_public_keys(key: str, path: str, text: str) -> list[PublicKey]:
    """Every PEM public key of the file, in file order, with its kid; at least one.

    Raises ConfigError naming the line for stray text, a block that is not a
    ``PUBLIC KEY`` (certificates, private keys), a block without its END line,
    a ``kid:`` line not directly followed by a block, a kid used twice, or a
    block that does not load.
    """
    lines = text.splitlines()
    keys: list[PublicKey] = []
    kids: dict[str, int] = {}
    kid: tuple[str, int] | None = None  # a pending "kid:" line and its number
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip()
        i += 1
        if line == _BEGIN:
            end = next(
                (j for j in range(i, len(lines)) if lines[j].strip().startswith("-----")), None
            )
            if end is None or lines[end].strip() != _END:
                raise ConfigError(f"{_where(key, path, number)}: {_BEGIN} without {_END}")
            block = "\n".join(s.strip() for s in lines[number - 1 : end + 1]) + "\n"
            try:
                public = load_pem_public_key(block.encode())
            except (ValueError, UnsupportedAlgorithm) as exc:
                raise ConfigError(f"{_where(key, path, number)}: bad PEM key: {exc}") from None
            keys.append(PublicKey(number, public, kid[0] if kid else None))
            kid, i = None, end + 1
            continue
        if kid is not None:
            raise ConfigError(
                f"{_where(key, path, kid[1])}: 'kid: {kid[0]}' must be directly followed "
                f"by a {_BEGIN} line"
            )
        if not line or line.startswith("#"):
            continue
        if match := _KID.fullmatch(line):
            name = match.group(1).split()
            if len(name) != 1 or name[0].startswith("#"):
                raise ConfigError(f'{_where(key, path, number)}: expected "kid: <name>"')
            if name[0] in kids:
                raise ConfigError(
                    f"{_where(key, path, number)}: kid {name[0]!r} is already used on "
                    f"line {kids[name[0]]}"
                )
            kids[name[0]] = number
            kid = (name[0], number)
            continue
        if other := _ANY_BEGIN.fullmatch(line):
            raise ConfigError(
                f"{_where(key, path, number)}: a {other.group(1)} block; only "
                f"{_BEGIN} blocks belong here"
            )
        raise ConfigError(
            f"{_where(key, path, number)}: unexpected text; expected {_BEGIN} blocks, each "
            'optionally preceded by a "kid: <name>" line, and blank or "#" lines'
        )
    if kid is not None:
        raise ConfigError(
            f"{_where(key, path, kid[1])}: 'kid: {kid[0]}' must be directly followed by a "
            f"{_BEGIN} line"
        )
    if not keys:
        raise ConfigError(f"{key}: {path} holds no {_BEGIN} block")
    return keys


def parse_password(key: str, path: str, text: str) -> str:
    """The one non-empty line of a password file, without surrounding whitespace.

    ``#`` is not special here: a password may start with it.
    """
    found: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if found is not None:
            raise ConfigError(
                f"{_where(key, path, number)}: a second non-empty line; the file must hold "
                f"exactly one line, the password (first on line {found[0]})"
            )
        found = (number, line.strip())
    if found is None:
        raise ConfigError(f"{key}: {path} is empty; it must hold the password on one line")
    return found[1]


def short_secret_warnings(key: str, path: str, secrets: list[Secret]) -> list[str]:
    """One warning per secret too short for HMAC signing, naming file, line and kid."""
    return [
        f"{_where(key, path, s.line)} ({f'kid {s.kid!r}' if s.kid else 'no kid'}): the secret "
        f"is shorter than "
        f"{MIN_HMAC_SECRET_BYTES} bytes: too weak for HMAC signing"
        for s in secrets
        if len(s.secret.encode()) < MIN_HMAC_SECRET_BYTES
    ]
