"""The whole config: every section in file order, and the table of its dotted keys."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from broker.config.auth import AuthConfig
from broker.config.ingest import IngestConfig, PublishConfig, ReplayConfig
from broker.config.redis import RedisConfig
from broker.config.schema import Key, Problem, keys_of
from broker.config.server import (
    AdminConfig,
    LimitsConfig,
    LogConfig,
    ServerConfig,
    ShutdownConfig,
    SseConfig,
)


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
    # The config file, when one was read.
    source: str | None = field(default=None, metadata={"key": False})

    def problems(self) -> Iterator[Problem]:
        """Rules spanning keys that this config breaks, in file order."""
        yield from self.redis.problems()
        admin = self.admin.listen_address
        if admin is not None and admin == self.server.listen_address:
            yield "admin.listen", "must differ from server.listen", "admin.listen"
        yield from self.ingest.problems()
        yield from self.auth.problems()


# Every key by dotted name ("auth.jwt.secret"), and every table ("auth.jwt"), in
# config/broker.toml order.
KEYS: dict[str, Key]
TABLES: dict[str, type[Any]]
KEYS, TABLES = keys_of(Config)


def get(cfg: Config, key: str) -> Any:
    """The value of a dotted key."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value
