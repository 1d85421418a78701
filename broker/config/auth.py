"""``[auth]`` and its mode sections ``[auth.jwt]``, ``[auth.callback]``, ``[auth.laravel]``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from broker.auth.grants import PLACEHOLDER, crossing_problem
from broker.config.schema import (
    Check,
    Problem,
    at_least,
    between,
    each,
    non_empty,
    seconds,
    secret,
    setting,
    zero_or_at_least,
)
from broker.config.text import describe, safe_repr
from broker.keyfiles import HMAC_ALGORITHMS, JWT_ALGORITHMS

_COOKIE_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _cookie_name(*, allow_empty: bool) -> Check:
    def run(v: str) -> str | None:
        if (allow_empty and v == "") or _COOKIE_NAME.match(v):
            return None
        return f"must be a valid cookie name, got {describe(v)}"

    return run


def _query_param(v: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9_.~-]*", v):
        return None
    return f"must be a plain query parameter name, got {describe(v)}"


def _pattern(v: str) -> str | None:
    if not v or any(c.isspace() or not c.isprintable() for c in v):
        return f"entries must be non-empty channel patterns without spaces, got {describe(v)}"
    if "{" in PLACEHOLDER.sub("", v) or "}" in PLACEHOLDER.sub("", v):
        return f"only {{user}} and {{tenant}} placeholders are allowed, got {describe(v)}"
    if (problem := crossing_problem(v)) is not None:
        return f"{describe(v)}: {problem}"
    return None


def _algorithms(v: tuple[str, ...]) -> str | None:
    if not v:
        return "must name at least one algorithm"
    for alg in v:
        if alg not in JWT_ALGORITHMS:
            allowed = ", ".join(JWT_ALGORITHMS)
            return f"unsupported algorithm {describe(alg)} (allowed: {allowed})"
    return None


def _http_url(v: str) -> str | None:
    if v == "":
        return None
    parts = urlsplit(v)
    if parts.scheme in ("http", "https") and parts.netloc:
        return None
    return f"must be an http:// or https:// URL, got {describe(v)}"


@dataclass(frozen=True, slots=True)
class JwtConfig:
    algorithms: tuple[str, ...] = setting(("HS256",), _algorithms)
    secret: str = secret("")
    secret_file: str = setting("")
    public_key_file: str = setting("")
    audience: str = setting("")
    issuer: str = setting("")
    user_claim: str = setting("sub", non_empty)
    tenant_claim: str = setting("tenant")
    channels_claim: str = setting("channels")
    leeway_seconds: int = setting(5, between(0, 300))

    __repr__ = safe_repr

    def problems(self) -> Iterator[Problem]:
        """What ``auth.mode = "jwt"`` needs of these keys."""
        if self.secret and self.secret_file:
            yield "auth.jwt.secret", "set it or auth.jwt.secret_file, not both", "auth.jwt.secret"
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        if hmac and not (self.secret or self.secret_file):
            problem = f"auth.jwt.secret or auth.jwt.secret_file is required for {hmac[0]}"
            yield "auth.jwt.secret", problem, "auth.mode"
        keyed = [a for a in self.algorithms if a not in HMAC_ALGORITHMS]
        if keyed and not self.public_key_file:
            yield "auth.jwt.public_key_file", f"required for {keyed[0]}", "auth.mode"


# Callback and laravel modes both ask the app over HTTP: the settings of that call
# are declared once, here. A dataclass lists the fields of its last base first, so
# ``class CallbackConfig(HttpAuthConfig, _CallbackKeys)`` keeps the file's order: the
# mode's own keys (``url``, ...), then these. ``__slots__ = ()`` in the bases: the
# final classes hold every slot (two slotted bases cannot be combined), and a base
# cannot be made on its own.
@dataclass(frozen=True)
class HttpAuthConfig:
    """The HTTP call to the app that authorizes a stream (callback and laravel modes)."""

    __slots__ = ()
    credential_cookies: tuple[str, ...] = setting(
        ("laravel_session",), each(_cookie_name(allow_empty=False))
    )
    timeout_seconds: float = setting(2.0, seconds(60))
    cache_ttl_seconds: int = setting(30, at_least(0))
    max_concurrency: int = setting(64, at_least(1))


@dataclass(frozen=True)
class _CallbackKeys:
    __slots__ = ()
    url: str = setting("", _http_url)
    key: str = secret("")


@dataclass(frozen=True, slots=True)
class CallbackConfig(HttpAuthConfig, _CallbackKeys):
    __repr__ = safe_repr


@dataclass(frozen=True)
class _LaravelKeys:
    __slots__ = ()
    url: str = setting("http://127.0.0.1/broadcasting/auth", _http_url)
    max_channels_per_request: int = setting(8, between(1, 1000))


@dataclass(frozen=True, slots=True)
class LaravelConfig(HttpAuthConfig, _LaravelKeys):
    pass


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: Literal["none", "jwt", "callback", "laravel"] = setting("none")
    public_channels: tuple[str, ...] | None = setting(None, each(_pattern))
    grants: tuple[str, ...] = setting((), each(_pattern))
    cookie: str = setting("sse_token", _cookie_name(allow_empty=True))
    query_param: str = setting("token", _query_param)
    recheck_interval_seconds: int = setting(600, zero_or_at_least(10))
    max_calls_per_client: int = setting(4, at_least(1))
    jwt: JwtConfig = field(default_factory=JwtConfig)
    callback: CallbackConfig = field(default_factory=CallbackConfig)
    laravel: LaravelConfig = field(default_factory=LaravelConfig)

    @property
    def effective_public_channels(self) -> tuple[str, ...]:
        """``public_channels``, or its mode-dependent default when unset."""
        if self.public_channels is not None:
            return self.public_channels
        return ("*",) if self.mode == "none" else ()

    def problems(self) -> Iterator[Problem]:
        """What the chosen mode needs of its section."""
        if self.mode == "jwt":
            yield from self.jwt.problems()
        if self.mode == "callback" and not self.callback.url:
            yield "auth.callback.url", "required when auth.mode = 'callback'", "auth.mode"
        if self.mode == "laravel" and not self.laravel.url:
            yield "auth.laravel.url", "required when auth.mode = 'laravel'", "auth.mode"
