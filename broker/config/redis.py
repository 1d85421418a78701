"""``[redis]``: where the broker reads events from and writes published ones to."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from broker.config.listen import host_port
from broker.config.schema import Problem, between, each, secret, setting
from broker.config.text import describe, safe_repr


def _redis_url(v: str) -> str | None:
    # The value is a secret: describe the problem, never echo the URL.
    try:
        parts = urlsplit(v)
        _ = parts.port
    except ValueError:
        return "is not a valid URL (check the host and port)"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return f"scheme must be redis, rediss or unix, got {describe(parts.scheme)}"
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            return "unix URLs need an absolute socket path: unix:///run/redis/redis.sock"
    elif parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return "the path must be a database number, e.g. redis://127.0.0.1:6379/0"
    return None


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = secret("redis://127.0.0.1:6379/0", _redis_url)
    password_file: str = setting("")
    sentinels: tuple[str, ...] = setting((), each(host_port))
    sentinel_master: str = setting("")
    max_connections: int = setting(32, between(4, 10000))

    __repr__ = safe_repr

    def problems(self) -> Iterator[Problem]:
        if self.sentinels and not self.sentinel_master:
            yield "redis.sentinel_master", "required when redis.sentinels is set", "redis.sentinels"
        if self.password_file and urlsplit(self.url).password:
            yield (
                "redis.password_file",
                "set it or a password in redis.url, not both",
                "redis.password_file",
            )
