"""Broker configuration: one frozen dataclass per TOML section, loaded from file + env + ``--set``.

Every key of ``config/broker.toml`` is a dataclass field here; the table of
known keys, the ``SSE_BROKER_*`` environment names and the TOML dump are all
derived from these classes, so adding a field is the only step needed to add a
key (plus its check in ``_CHECKS`` and its line in ``config/broker.toml``).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from broker.auth.grants import PLACEHOLDER, crossing_problem
from broker.errors import ConfigError
from broker.keyfiles import parse_secrets, short_secret_warnings

ENV_PREFIX = "SSE_BROKER_"
# Read by the CLI, not a key: it names the file that holds the keys.
ENV_CONFIG = "SSE_BROKER_CONFIG"
# Set by the worker supervisor for the processes it starts (not a config key).
ENV_WORKER = "SSE_BROKER_WORKER"
REDACTED = "***"


def _secret(default: Any) -> Any:
    # repr=False keeps the value out of the generated repr even if someone drops
    # the hand-written __repr__; the metadata drives redaction in dumps and errors.
    return field(default=default, repr=False, metadata={"secret": True})


def _safe_repr(self: Any) -> str:
    parts = []
    for f in fields(self):
        value = getattr(self, f.name)
        if f.metadata.get("secret"):
            value = _redact(f"{type(self).__name__}.{f.name}", value)
        parts.append(f"{f.name}={value!r}")
    return f"{type(self).__name__}({', '.join(parts)})"


# --------------------------------------------------------------------------- listen addresses


@dataclass(frozen=True, slots=True)
class Listen:
    """A parsed listen address: TCP (``host``, ``port``) or a unix socket (``path``)."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None


_HOSTNAME = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)
# sun_path is 108 bytes on Linux including the terminating NUL.
_UNIX_PATH_MAX = 107


def _split_listen(value: str) -> Listen:
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f'unix socket path must be absolute, got "{value}"')
        if len(path.encode()) > _UNIX_PATH_MAX:
            raise ValueError(f"unix socket path longer than {_UNIX_PATH_MAX} bytes")
        return Listen(path=path)
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f'expected "host:port", "[v6addr]:port" or "unix:/path", got "{value}"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f'"{host}" is not an IPv6 address') from None
    elif ":" in host:
        raise ValueError(f'IPv6 addresses need brackets, e.g. "[::1]:8080", got "{value}"')
    elif not _HOSTNAME.match(host):
        raise ValueError(f'"{host}" is not a host name or IP address (all interfaces: "0.0.0.0")')
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f'port must be 1-65535, got "{port_text}"')
    return Listen(host=host, port=int(port_text))


def parse_listen(value: str, key: str) -> Listen:
    """Parse ``host:port``, ``[::1]:port`` or ``unix:/abs/path``; ConfigError names ``key``."""
    try:
        return _split_listen(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:8080"
    path: str = "/events"
    cors_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    workers: int = 1
    header_timeout_seconds: int = 10

    @property
    def listen_address(self) -> Listen:
        return parse_listen(self.listen, "server.listen")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: str = "127.0.0.1:9464"

    @property
    def listen_address(self) -> Listen | None:
        """None when the admin listener is disabled (``listen = ""``)."""
        return parse_listen(self.listen, "admin.listen") if self.listen else None


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = _secret("redis://127.0.0.1:6379/0")
    password_file: str = ""
    sentinels: tuple[str, ...] = ()
    sentinel_master: str = ""
    max_connections: int = 32

    __repr__ = _safe_repr

    @property
    def safe_url(self) -> str:
        """``url`` with any password replaced by ``***``, fit for logs."""
        return _redact_url(self.url)


@dataclass(frozen=True, slots=True)
class IngestConfig:
    mode: str = "pubsub"
    format: str = "native"
    prefix: str = "sse:"
    stream_key: str = "sse:stream"
    canary_interval_seconds: int = 5


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    ttl_seconds: int = 300
    max_events: int = 10000
    max_bytes: int = 67108864
    max_retained_keys: int = 100000
    max_retained_bytes: int = 67108864
    max_resume_scan: int = 20000
    max_concurrent_scans: int = 4


@dataclass(frozen=True, slots=True)
class SseConfig:
    heartbeat_seconds: int = 15
    retry_ms: int = 3000
    max_connection_age_seconds: int = 1800
    write_timeout_seconds: int = 30


@dataclass(frozen=True, slots=True)
class JwtConfig:
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str = _secret("")
    secret_file: str = ""
    public_key_file: str = ""
    audience: str = ""
    issuer: str = ""
    user_claim: str = "sub"
    tenant_claim: str = "tenant"
    channels_claim: str = "channels"
    leeway_seconds: int = 5

    __repr__ = _safe_repr


@dataclass(frozen=True, slots=True)
class CallbackConfig:
    url: str = ""
    key: str = _secret("")
    credential_cookies: tuple[str, ...] = ("laravel_session",)
    timeout_seconds: float = 2.0
    cache_ttl_seconds: int = 30
    max_concurrency: int = 64

    __repr__ = _safe_repr


@dataclass(frozen=True, slots=True)
class LaravelConfig:
    url: str = "http://127.0.0.1/broadcasting/auth"
    max_channels_per_request: int = 8
    credential_cookies: tuple[str, ...] = ("laravel_session",)
    timeout_seconds: float = 2.0
    cache_ttl_seconds: int = 30
    max_concurrency: int = 64


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: str = "none"
    public_channels: tuple[str, ...] | None = None
    grants: tuple[str, ...] = ()
    cookie: str = "sse_token"
    query_param: str = "token"
    recheck_interval_seconds: int = 600
    max_calls_per_client: int = 4
    jwt: JwtConfig = field(default_factory=JwtConfig)
    callback: CallbackConfig = field(default_factory=CallbackConfig)
    laravel: LaravelConfig = field(default_factory=LaravelConfig)

    @property
    def effective_public_channels(self) -> tuple[str, ...]:
        """``public_channels``, or its mode-dependent default when unset."""
        if self.public_channels is not None:
            return self.public_channels
        return ("*",) if self.mode == "none" else ()


@dataclass(frozen=True, slots=True)
class PublishConfig:
    keys: tuple[str, ...] = _secret(())
    keys_file: str = ""

    __repr__ = _safe_repr


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = 100000
    max_connections_per_tenant: int = 0
    max_connections_per_ip: int = 0
    max_pending_connections_per_ip: int = 64
    max_channels_per_connection: int = 32
    max_event_bytes: int = 262144
    write_buffer_bytes: int = 262144


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    drain_seconds: int = 10


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    sse: SseConfig = field(default_factory=SseConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str | None = None  # the config file, when one was read


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True, slots=True)
class _Key:
    kind: str  # int | float | str | bool | strs | opt_strs
    secret: bool


_KINDS: dict[object, str] = {
    int: "int",
    float: "float",
    str: "str",
    bool: "bool",
    tuple[str, ...]: "strs",
    tuple[str, ...] | None: "opt_strs",
}
_KEYS: dict[str, _Key] = {}
_TABLES: dict[str, type[Any]] = {}


def _register(cls: type[Any], prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if cls is Config and f.name == "source":
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        hint = hints[f.name]
        if isinstance(hint, type) and is_dataclass(hint):
            _TABLES[path] = hint
            _register(hint, path)
        else:
            _KEYS[path] = _Key(_KINDS[hint], bool(f.metadata.get("secret")))


_register(Config, "")


def env_var(key: str) -> str:
    """The variable overriding a dotted key: ``redis.url`` -> ``SSE_BROKER_REDIS_URL``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


_ENV_KEYS = {env_var(key): key for key in _KEYS}
if len(_ENV_KEYS) != len(_KEYS) or ENV_CONFIG in _ENV_KEYS:
    raise RuntimeError("two config keys map to the same SSE_BROKER_* variable")


def known_keys() -> list[str]:
    """Every dotted key, in ``config/broker.toml`` order."""
    return list(_KEYS)


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


# --------------------------------------------------------------------------- redaction, TOML text


def _redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc, query = parts.netloc, parts.query
    if not parts.password and "password" not in query:
        return url  # untouched: rebuilding could change how it is spelled
    if parts.password:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{REDACTED}@{hostinfo}"
    if "password" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if k == "password" else v) for k, v in pairs], safe="*")
    # Not urlunsplit: it turns "unix:///path" into "unix:/path".
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
    return (
        rebuilt + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    )


def _redact(key: str, value: Any) -> Any:
    if key.endswith(".url") and isinstance(value, str):
        return _redact_url(value)
    if isinstance(value, tuple):
        return tuple(REDACTED for _ in value)
    return REDACTED if value else value


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _describe(value: Any, *, secret: bool = False) -> str:
    """A short rendering of a bad value for an error message; never a secret."""
    if isinstance(value, dict):
        return "a table"
    if secret or not isinstance(value, str | int | float | bool | list | tuple):
        return f"a {type(value).__name__}" + (" (value hidden)" if secret else "")
    try:
        text = _toml_value(value)
    except TypeError:
        return "an array of mixed values"
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- checks

Check = Callable[[Any], str | None]


def _between(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}, got {v}"


def _at_least(low: int) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}, got {v}"


def _zero_or_at_least(low: int) -> Check:
    return lambda v: None if v == 0 or v >= low else f"must be 0 (never) or >= {low}, got {v}"


def _seconds(high: float) -> Check:
    return lambda v: None if 0 < v <= high else f"must be > 0 and <= {high:g}, got {v:g}"


def _one_of(*choices: str) -> Check:
    allowed = " | ".join(choices)
    return lambda v: None if v in choices else f"must be one of {allowed}, got {_describe(v)}"


def _each(check: Check) -> Check:
    def run(values: tuple[str, ...]) -> str | None:
        for v in values:
            if (problem := check(v)) is not None:
                return problem
        return None

    return run


def _non_empty(v: str) -> str | None:
    return None if v else "must not be empty"


def _listen(*, allow_empty: bool) -> Check:
    def run(v: str) -> str | None:
        if allow_empty and v == "":
            return None
        try:
            _split_listen(v)
        except ValueError as exc:
            return str(exc)
        return None

    return run


def _host_port(v: str) -> str | None:
    try:
        addr = _split_listen(v)
    except ValueError as exc:
        return f"entry {_describe(v)}: {exc}"
    return f'entries must be "host:port", got {_describe(v)}' if addr.is_unix else None


def _url_path(v: str) -> str | None:
    if not v.startswith("/") or any(c in v for c in "?# \t\r\n"):
        return f'must be a URL path starting with "/", got {_describe(v)}'
    if v in ("/healthz", "/readyz"):
        return f"{v} is the broker's own health endpoint"
    return None


_ORIGIN = re.compile(
    r"^[a-z][a-z0-9+.-]*://(\*\.)?([a-z0-9-]+(\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(:(?P<port>\d{1,5}))?$",
    re.IGNORECASE,
)


def _origin(v: str) -> str | None:
    m = _ORIGIN.match(v)
    if m and (m["port"] is None or 1 <= int(m["port"]) <= 65535):
        return None
    return (
        f"entries must look like scheme://host[:port] (host may start with *.; no path, "
        f"no trailing slash), got {_describe(v)}"
    )


def _ip_or_network(v: str) -> str | None:
    try:
        ipaddress.ip_network(v, strict=False)
    except ValueError:
        return f"entries must be IP addresses or CIDR networks, got {_describe(v)}"
    return None


def _redis_url(v: str) -> str | None:
    # The value is a secret: describe the problem, never echo the URL.
    try:
        parts = urlsplit(v)
        _ = parts.port
    except ValueError:
        return "is not a valid URL (check the host and port)"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return f"scheme must be redis, rediss or unix, got {_describe(parts.scheme)}"
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            return "unix URLs need an absolute socket path: unix:///run/redis/redis.sock"
    elif parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return "the path must be a database number, e.g. redis://127.0.0.1:6379/0"
    return None


_COOKIE_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _cookie_name(*, allow_empty: bool) -> Check:
    def run(v: str) -> str | None:
        if (allow_empty and v == "") or _COOKIE_NAME.match(v):
            return None
        return f"must be a valid cookie name, got {_describe(v)}"

    return run


def _query_param(v: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9_.~-]*", v):
        return None
    return f"must be a plain query parameter name, got {_describe(v)}"


def _pattern(v: str) -> str | None:
    if not v or any(c.isspace() or not c.isprintable() for c in v):
        return f"entries must be non-empty channel patterns without spaces, got {_describe(v)}"
    if "{" in PLACEHOLDER.sub("", v) or "}" in PLACEHOLDER.sub("", v):
        return f"only {{user}} and {{tenant}} placeholders are allowed, got {_describe(v)}"
    if (problem := crossing_problem(v)) is not None:
        return f"{_describe(v)}: {problem}"
    return None


_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_KEY_ALGORITHMS = (*_RSA_ALGORITHMS, "ES256", "ES384", "ES512", "EdDSA")


def _algorithms(v: tuple[str, ...]) -> str | None:
    if not v:
        return "must name at least one algorithm"
    for alg in v:
        if alg not in _HMAC_ALGORITHMS + _KEY_ALGORITHMS:
            allowed = ", ".join(_HMAC_ALGORITHMS + _KEY_ALGORITHMS)
            return f"unsupported algorithm {_describe(alg)} (allowed: {allowed})"
    return None


def _http_url(v: str) -> str | None:
    if v == "":
        return None
    parts = urlsplit(v)
    if parts.scheme in ("http", "https") and parts.netloc:
        return None
    return f"must be an http:// or https:// URL, got {_describe(v)}"


def _publish_keys(v: tuple[str, ...]) -> str | None:
    return None if all(v) else "entries must be non-empty strings"


_CHECKS: dict[str, Check] = {
    "server.listen": _listen(allow_empty=False),
    "server.path": _url_path,
    "server.cors_origins": _each(_origin),
    "server.trusted_proxies": _each(_ip_or_network),
    "server.workers": _between(1, 256),
    "server.header_timeout_seconds": _between(1, 300),
    "admin.listen": _listen(allow_empty=True),
    "redis.url": _redis_url,
    "redis.sentinels": _each(_host_port),
    "redis.max_connections": _between(4, 10000),
    "ingest.mode": _one_of("pubsub", "stream"),
    "ingest.format": _one_of("native", "laravel"),
    "ingest.stream_key": _non_empty,
    "ingest.canary_interval_seconds": _between(0, 3600),
    "replay.ttl_seconds": _at_least(1),
    "replay.max_events": _at_least(0),
    "replay.max_bytes": _at_least(0),
    "replay.max_retained_keys": _at_least(0),
    "replay.max_retained_bytes": _at_least(0),
    "replay.max_resume_scan": _at_least(0),
    "replay.max_concurrent_scans": _between(1, 1000),
    "sse.heartbeat_seconds": _between(1, 3600),
    "sse.retry_ms": _between(0, 3_600_000),
    "sse.max_connection_age_seconds": _zero_or_at_least(10),
    "sse.write_timeout_seconds": _between(1, 3600),
    "auth.mode": _one_of("none", "jwt", "callback", "laravel"),
    "auth.public_channels": _each(_pattern),
    "auth.grants": _each(_pattern),
    "auth.cookie": _cookie_name(allow_empty=True),
    "auth.query_param": _query_param,
    "auth.recheck_interval_seconds": _zero_or_at_least(10),
    "auth.max_calls_per_client": _at_least(1),
    "auth.jwt.algorithms": _algorithms,
    "auth.jwt.user_claim": _non_empty,
    "auth.jwt.leeway_seconds": _between(0, 300),
    "auth.callback.url": _http_url,
    "auth.callback.credential_cookies": _each(_cookie_name(allow_empty=False)),
    "auth.callback.timeout_seconds": _seconds(60),
    "auth.callback.cache_ttl_seconds": _at_least(0),
    "auth.callback.max_concurrency": _at_least(1),
    "auth.laravel.url": _http_url,
    "auth.laravel.max_channels_per_request": _between(1, 1000),
    "auth.laravel.credential_cookies": _each(_cookie_name(allow_empty=False)),
    "auth.laravel.timeout_seconds": _seconds(60),
    "auth.laravel.cache_ttl_seconds": _at_least(0),
    "auth.laravel.max_concurrency": _at_least(1),
    "publish.keys": _publish_keys,
    "limits.max_connections": _at_least(0),
    "limits.max_connections_per_tenant": _at_least(0),
    "limits.max_connections_per_ip": _at_least(0),
    "limits.max_pending_connections_per_ip": _at_least(0),
    "limits.max_channels_per_connection": _at_least(1),
    "limits.max_event_bytes": _between(64, 67_108_864),
    "limits.write_buffer_bytes": _at_least(4096),
    "shutdown.drain_seconds": _between(0, 3600),
    "log.level": _one_of("debug", "info", "warning", "error"),
    "log.format": _one_of("text", "json"),
}


def _cross_checks(cfg: Config) -> Iterator[tuple[str, str, str]]:
    """Rules spanning keys: (key, problem, key whose source to blame)."""
    if cfg.redis.sentinels and not cfg.redis.sentinel_master:
        yield "redis.sentinel_master", "required when redis.sentinels is set", "redis.sentinels"
    if cfg.redis.password_file and urlsplit(cfg.redis.url).password:
        yield (
            "redis.password_file",
            "set it or a password in redis.url, not both",
            "redis.password_file",
        )
    if cfg.admin.listen and _split_listen(cfg.admin.listen) == _split_listen(cfg.server.listen):
        yield "admin.listen", "must differ from server.listen", "admin.listen"
    if cfg.ingest.mode == "stream" and cfg.ingest.format == "laravel":
        # Laravel's broadcaster PUBLISHes; there is no stream for the broker to read.
        yield "ingest.format", "'laravel' requires ingest.mode = 'pubsub'", "ingest.format"
    auth = cfg.auth
    if auth.mode == "jwt":
        jwt = auth.jwt
        if jwt.secret and jwt.secret_file:
            yield "auth.jwt.secret", "set it or auth.jwt.secret_file, not both", "auth.jwt.secret"
        hmac = [a for a in jwt.algorithms if a in _HMAC_ALGORITHMS]
        if hmac and not (jwt.secret or jwt.secret_file):
            problem = f"auth.jwt.secret or auth.jwt.secret_file is required for {hmac[0]}"
            yield "auth.jwt.secret", problem, "auth.mode"
        keyed = [a for a in jwt.algorithms if a not in _HMAC_ALGORITHMS]
        if keyed and not jwt.public_key_file:
            yield "auth.jwt.public_key_file", f"required for {keyed[0]}", "auth.mode"
    if auth.mode == "callback" and not auth.callback.url:
        yield "auth.callback.url", "required when auth.mode = 'callback'", "auth.mode"
    if auth.mode == "laravel" and not auth.laravel.url:
        yield "auth.laravel.url", "required when auth.mode = 'laravel'", "auth.mode"


# --------------------------------------------------------------------------- loading


class _Invalid(ValueError):
    pass


def _convert(key: str, raw: Any) -> Any:
    spec = _KEYS[key]
    got = _describe(raw, secret=spec.secret)
    if spec.kind == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        raise _Invalid(f"expected an integer, got {got}")
    if spec.kind == "float":
        if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
            return float(raw)
        raise _Invalid(f"expected a number, got {got}")
    if spec.kind == "str":
        if isinstance(raw, str):
            return raw
        raise _Invalid(f"expected a string, got {got}")
    if spec.kind == "bool":
        if isinstance(raw, bool):
            return raw
        raise _Invalid(f"expected true or false, got {got}")
    if isinstance(raw, list) and all(isinstance(v, str) for v in raw):
        return tuple(raw)
    raise _Invalid(f'expected an array of strings like ["a", "b"], got {got}')


def _parse_text(key: str, raw: str) -> Any:
    """An env or ``--set`` value: TOML value syntax, else the raw text as a string."""
    try:
        doc = tomllib.loads(f"x = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    if doc.keys() != {"x"}:  # a newline in the value smuggled in another key
        return raw
    value = doc["x"]
    if _KEYS[key].kind == "str" and not isinstance(value, str):
        return raw
    return value


def _suggest(name: str, candidates: Sequence[str], prefix: str = "") -> str:
    """``, did you mean "x"?`` for the closest candidate, or ""; matching ignores ``prefix``."""
    name = name.removeprefix(prefix)
    names = [c.removeprefix(prefix) for c in candidates]
    leaf = name.rsplit(".", 1)[-1]
    # A known key in the wrong section is the likeliest mistake; difflib covers typos.
    same_leaf = [c for c in names if c.rsplit(".", 1)[-1] == leaf]
    close = same_leaf if len(same_leaf) == 1 else difflib.get_close_matches(name, names, n=1)
    return f', did you mean "{prefix}{close[0]}"?' if close else ""


def _walk_file(
    table: dict[str, Any],
    prefix: str,
    origin: str,
    out: list[tuple[str, Any, str]],
    errors: list[str],
) -> None:
    for name, value in table.items():
        path = f"{prefix}.{name}" if prefix else name
        if path in _TABLES:
            if isinstance(value, dict):
                _walk_file(value, path, origin, out, errors)
            else:
                errors.append(
                    f"{path}: expected a table [{path}], got {_describe(value)} (from {origin})"
                )
        elif path in _KEYS:
            out.append((path, value, origin))
        else:
            what = "section" if isinstance(value, dict) else "key"
            hint = _suggest(path, [*_KEYS, *_TABLES])
            errors.append(f"{path}: unknown {what}{hint} (from {origin})")


def _read_file(path: str, errors: list[str]) -> list[tuple[str, Any, str]]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    out: list[tuple[str, Any, str]] = []
    _walk_file(doc, "", path, out, errors)
    return out


def _read_env(env: Mapping[str, str], errors: list[str]) -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in (ENV_CONFIG, ENV_WORKER):
            continue
        key = _ENV_KEYS.get(name)
        if key is None:
            hint = _suggest(name, list(_ENV_KEYS), ENV_PREFIX)
            errors.append(f"{name}: unknown environment variable, no such config key{hint}")
        else:
            out.append((key, _parse_text(key, env[name]), name))
    return out


def _read_overrides(overrides: Sequence[str], errors: list[str]) -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            errors.append(f"--set {_describe(item)}: expected section.key=value")
        elif key in _TABLES:
            errors.append(f"{key}: is a section, set its keys one by one (from --set)")
        elif key not in _KEYS:
            errors.append(f"{key}: unknown key{_suggest(key, list(_KEYS))} (from --set)")
        else:
            # Typed by hand: "--set 'log.level = debug'" means "debug".
            out.append((key, _parse_text(key, raw.strip()), "--set"))
    return out


def _fail(errors: list[str]) -> None:
    if errors:
        raise ConfigError("\n".join(errors))


def read_config_file(key: str, path: str) -> str:
    """The text of a file a config key names (secrets, keys); ConfigError naming the key."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Load, validate and return the effective config.

    Precedence: ``overrides`` (``section.key=value``) > ``SSE_BROKER_*`` env >
    the TOML file > defaults. ``env=None`` reads ``os.environ``; ``SSE_BROKER_CONFIG``
    is ignored here (the CLI turns it into ``path``). Every problem found is
    reported in one ConfigError, one line each, naming the key and its source.
    """
    source = os.fspath(path) if path is not None else None
    errors: list[str] = []
    provided = _read_file(source, errors) if source is not None else []
    provided += _read_env(os.environ if env is None else env, errors)
    provided += _read_overrides(overrides, errors)

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    # Every provided value is checked, even one a later source overrides, so
    # `check-config FILE` gives the same verdict whatever the environment says.
    for key, raw, origin in provided:
        try:
            value = _convert(key, raw)
        except _Invalid as exc:
            errors.append(f"{key}: {exc} (from {origin})")
            continue
        check = _CHECKS.get(key)
        if check is not None and (problem := check(value)) is not None:
            errors.append(f"{key}: {problem} (from {origin})")
            continue
        values[key] = value
        origins[key] = origin
    _fail(errors)

    built: Config = _build(Config, "", values)
    cfg = replace(built, source=source)
    for key, problem, blame in _cross_checks(cfg):
        blamed = origins.get(blame) or origins.get(key)
        errors.append(f"{key}: {problem}" + (f" (from {blamed})" if blamed else ""))
    _fail(errors)
    return cfg


def _build(cls: type[Any], prefix: str, values: Mapping[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if path in _TABLES:
            kwargs[f.name] = _build(_TABLES[path], path, values)
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


# --------------------------------------------------------------------------- output


def dump_config(cfg: Config) -> str:
    """The effective config as TOML, secrets replaced by ``***``; loads back to ``cfg``."""
    lines = ["# sse-broker effective configuration"]
    if cfg.source is not None:
        lines.append(f"# file: {_toml_str(cfg.source)}")
    for table in _TABLES:
        lines += ["", f"[{table}]"]
        for key, spec in _KEYS.items():
            if key.rpartition(".")[0] != table:
                continue
            name = key.rpartition(".")[2]
            value = _get(cfg, key)
            if value is None:
                effective = _toml_value(cfg.auth.effective_public_channels)
                lines.append(f"# {name} = {effective}  (unset: the default for this mode)")
                continue
            if spec.secret:
                value = _redact(key, value)
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


_PROXY_READ_TIMEOUT = 60  # nginx proxy_read_timeout default


def _is_loopback(addr: Listen) -> bool:
    if addr.is_unix or addr.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr.host or "").is_loopback
    except ValueError:
        return False  # a host name: can't tell, assume reachable


def config_warnings(cfg: Config) -> list[str]:
    """Legal but risky settings, one human sentence each, for check-config and startup logs."""
    warnings: list[str] = []
    auth = cfg.auth
    if auth.mode == "none":
        public = ", ".join(auth.effective_public_channels) or "none"
        warnings.append(
            "AUTH IS OFF (auth.mode = 'none'): no credentials are checked; anyone who can reach "
            f"{cfg.server.listen} may subscribe to the public channels ({public}) - every "
            "channel but private-*/presence-* when that is '*'"
        )
    elif "*" in auth.effective_public_channels:
        warnings.append(
            "auth.public_channels contains '*': every channel but private-*/presence-* "
            "can be subscribed without credentials"
        )
    if cfg.ingest.mode == "pubsub" and cfg.server.workers > 1:
        warnings.append(
            f"server.workers = {cfg.server.workers} with ingest.mode = 'pubsub': replay history is "
            "per process, so a resume is exact only when it reaches the same worker (others "
            "reset); use ingest.mode = 'stream' for exact resume anywhere"
        )
    if cfg.sse.heartbeat_seconds >= _PROXY_READ_TIMEOUT:
        warnings.append(
            f"sse.heartbeat_seconds = {cfg.sse.heartbeat_seconds}: a reverse proxy's read timeout "
            f"(nginx default {_PROXY_READ_TIMEOUT}s) will cut idle streams; keep it well below"
        )
    admin = cfg.admin.listen_address
    if admin is not None and not _is_loopback(admin):
        warnings.append(
            f"admin.listen = {cfg.admin.listen!r} is not loopback: /metrics, /publish and "
            "/admin/disconnect must never be public; firewall it"
        )
    if admin is None and (cfg.publish.keys or cfg.publish.keys_file):
        warnings.append("publish keys are set but admin.listen is empty: POST /publish is off")
    if cfg.limits.write_buffer_bytes < cfg.limits.max_event_bytes:
        warnings.append(
            "limits.write_buffer_bytes < limits.max_event_bytes: one large event can make a "
            "healthy client look like a slow consumer"
        )
    if cfg.replay.max_events == 0 or cfg.replay.max_bytes == 0:
        warnings.append(
            "replay history is disabled (max_events or max_bytes = 0): every resume resets"
        )
    if auth.mode == "jwt" and auth.jwt.secret and len(auth.jwt.secret.encode()) < 32:
        warnings.append("auth.jwt.secret is shorter than 32 bytes: too weak for HMAC signing")
    if auth.mode == "jwt" and auth.jwt.secret_file:
        warnings += _secret_file_warnings(auth.jwt.secret_file)
    return warnings


def _secret_file_warnings(path: str) -> list[str]:
    """Short secrets of ``auth.jwt.secret_file``, one warning per line (never the secret)."""
    key = "auth.jwt.secret_file"
    try:
        secrets = parse_secrets(key, path, read_config_file(key, path))
    except ConfigError:
        return []  # an unreadable or malformed file is an error, reported by loading the keys
    return short_secret_warnings(key, path, secrets)
