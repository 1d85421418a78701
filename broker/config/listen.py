"""Listen addresses: ``host:port``, ``[v6addr]:port`` or ``unix:/abs/path``, parsed once."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from broker.config.text import describe
from broker.errors import ConfigError


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


def split_listen(value: str) -> Listen:
    """Parse a listen address; ValueError says what is wrong (without the key)."""
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
        return split_listen(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def host_port(v: str) -> str | None:
    """Check of a ``host:port`` entry (a Sentinel): a listen address, but not a unix one."""
    try:
        addr = split_listen(v)
    except ValueError as exc:
        return f"entry {describe(v)}: {exc}"
    return f'entries must be "host:port", got {describe(v)}' if addr.is_unix else None
