"""The listener sections and the per-process knobs: ``[server]``, ``[admin]``, ``[sse]``,
``[limits]``, ``[shutdown]`` and ``[log]``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from broker.config.listen import Listen, split_listen
from broker.config.schema import Parsed, at_least, between, each, parses, setting, zero_or_at_least
from broker.config.text import describe

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _url_path(v: str) -> str | None:
    if not v.startswith("/") or any(c in v for c in "?# \t\r\n"):
        return f'must be a URL path starting with "/", got {describe(v)}'
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
        f"no trailing slash), got {describe(v)}"
    )


def _network(v: str) -> Network:
    try:
        return ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ValueError(
            f"entries must be IP addresses or CIDR networks, got {describe(v)}"
        ) from None


class _ServerParsed(Parsed):
    __slots__ = ("listen_address", "trusted_networks")
    listen_address: Listen  # ``listen``, parsed
    trusted_networks: tuple[Network, ...]  # ``trusted_proxies``, parsed (as written)


@dataclass(frozen=True, slots=True)
class ServerConfig(_ServerParsed):
    listen: str = setting("127.0.0.1:8080", parses(split_listen))
    path: str = setting("/events", _url_path)
    cors_origins: tuple[str, ...] = setting((), each(_origin))
    trusted_proxies: tuple[str, ...] = setting((), each(parses(_network)))
    workers: int = setting(1, between(1, 256))
    header_timeout_seconds: int = setting(10, between(1, 300))

    def __post_init__(self) -> None:
        object.__setattr__(self, "listen_address", split_listen(self.listen))
        networks = tuple(_network(entry) for entry in self.trusted_proxies)
        object.__setattr__(self, "trusted_networks", networks)


class _AdminParsed(Parsed):
    __slots__ = ("listen_address",)
    listen_address: Listen | None  # ``listen``, parsed; None when disabled (``listen = ""``)


@dataclass(frozen=True, slots=True)
class AdminConfig(_AdminParsed):
    listen: str = setting("127.0.0.1:9464", parses(split_listen, allow_empty=True))

    def __post_init__(self) -> None:
        address = split_listen(self.listen) if self.listen else None
        object.__setattr__(self, "listen_address", address)


@dataclass(frozen=True, slots=True)
class SseConfig:
    heartbeat_seconds: int = setting(15, between(1, 3600))
    retry_ms: int = setting(3000, between(0, 3_600_000))
    max_connection_age_seconds: int = setting(1800, zero_or_at_least(10))
    write_timeout_seconds: int = setting(30, between(1, 3600))


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = setting(100000, at_least(0))
    max_connections_per_tenant: int = setting(0, at_least(0))
    max_connections_per_ip: int = setting(0, at_least(0))
    max_pending_connections_per_ip: int = setting(64, at_least(0))
    max_channels_per_connection: int = setting(32, at_least(1))
    max_event_bytes: int = setting(262144, between(64, 67_108_864))
    write_buffer_bytes: int = setting(262144, at_least(4096))


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    drain_seconds: int = setting(10, between(0, 3600))


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = setting("info")
    format: Literal["text", "json"] = setting("text")
