"""Where Redis is and how to log in: one place for the URL, password file and TLS."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from broker.config import RedisConfig
from broker.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RedisTarget:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    def describe(self) -> str:
        """Where we connect, for logs (never the password)."""
        scheme = "rediss" if self.tls else "redis"
        return f"unix:{self.path}" if self.path else f"{scheme}://{self.host}:{self.port}/{self.db}"

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context() if self.tls else None

    def client(self, **kwargs: Any) -> aioredis.Redis:
        """A redis-py asyncio client for commands (publishing, XREAD, retained state)."""
        common: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
            **kwargs,
        }
        if self.path:
            return aioredis.Redis(unix_socket_path=self.path, **common)
        return aioredis.Redis(host=self.host, port=self.port, ssl=self.tls, **common)


def redis_target(cfg: RedisConfig) -> RedisTarget:
    """Resolve ``redis.url`` and ``redis.password_file`` (the file wins over a URL password)."""
    try:
        parts = parse_url(cfg.url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"redis.url: {exc}") from None
    password = parts.get("password")
    if cfg.password_file:
        try:
            password = Path(cfg.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"redis.password_file: cannot read {cfg.password_file}: {exc}"
            ) from None
    cls = parts.get("connection_class")
    return RedisTarget(
        host=parts.get("host") or "127.0.0.1",
        port=int(parts.get("port") or 6379),
        path=parts.get("path") if cls is UnixDomainSocketConnection else None,
        db=int(parts.get("db") or 0),
        username=parts.get("username"),
        password=password,
        tls=cls is SSLConnection,
    )
