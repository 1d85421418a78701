"""Where Redis is and how to log in: one place for the URL, password file, TLS and Sentinel.

Both ways the broker talks to Redis go through :class:`RedisTarget`: the raw
pub/sub ingest asks it for an address and an SSL context on every (re)connect
(so after a Sentinel failover it finds the new master), and redis-py command
clients come from :meth:`RedisTarget.client` (with Sentinel: ``master_for``,
which re-discovers the master by itself).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from broker.config import RedisConfig, read_config_file
from broker.errors import ConfigError
from broker.keyfiles import parse_password

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """From ``rediss://...?ssl_cert_reqs=&ssl_ca_certs=&ssl_certfile=&ssl_keyfile=``."""

    cert_reqs: str = "required"
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_certs)
        if self.cert_reqs != "required":
            ctx.check_hostname = False
            ctx.verify_mode = _CERT_REQS[self.cert_reqs]
        if self.certfile:
            ctx.load_cert_chain(self.certfile, self.keyfile)
        return ctx

    def client_kwargs(self) -> dict[str, Any]:
        return {
            "ssl": True,
            "ssl_cert_reqs": self.cert_reqs,
            "ssl_ca_certs": self.ca_certs,
            "ssl_certfile": self.certfile,
            "ssl_keyfile": self.keyfile,
        }


@dataclass(frozen=True, slots=True)
class RedisTarget:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""

    def describe(self) -> str:
        """Where we connect, for logs (never the password)."""
        if self.sentinels:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel {self.master}@{hosts}/{self.db}"
        scheme = "rediss" if self.tls else "redis"
        return f"unix:{self.path}" if self.path else f"{scheme}://{self.host}:{self.port}/{self.db}"

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.context() if self.tls else None

    def _common(self) -> dict[str, Any]:
        common: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
        }
        if self.tls:
            common.update(self.tls.client_kwargs())
        return common

    def _sentinel(self) -> Sentinel:
        # A sentinel that is down must cost one short timeout, not redis-py's
        # default retries: the next sentinel is asked instead.
        quick = {
            "socket_timeout": 2.0,
            "socket_connect_timeout": 1.0,
            "retry": Retry(NoBackoff(), 0),
        }
        return Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels), sentinel_kwargs=quick, socket_timeout=2.0, **self._common()
        )

    async def address(self) -> tuple[str, int]:
        """The (current) master: asked of Sentinel on every call when configured."""
        if self.sentinels:
            host, port = await self._sentinel().discover_master(self.master)
            return str(host), int(port)
        return self.host, self.port

    def client(self, **kwargs: Any) -> aioredis.Redis:
        """A redis-py asyncio client for commands (publishing, XREAD, retained state)."""
        if self.sentinels:
            client: aioredis.Redis = self._sentinel().master_for(
                self.master, **{**self._common(), **kwargs}
            )
            return client
        common = {**self._common(), **kwargs}
        if self.path:
            common.pop("ssl", None)
            return aioredis.Redis(unix_socket_path=self.path, **common)
        return aioredis.Redis(host=self.host, port=self.port, **common)


POOL_WAIT_SECONDS = 5.0


def bounded_client(target: RedisTarget, max_connections: int) -> aioredis.Redis:
    """A command client that never opens more than ``max_connections`` connections.

    Past the bound a command waits (up to :data:`POOL_WAIT_SECONDS`) for a
    connection to come free instead of opening another: a burst of resumes or
    publishes queues at the broker instead of piling connections onto Redis.
    With Sentinel, redis-py's pool has no waiting variant: past the bound a
    command fails at once (and the caller's Redis-error path answers).
    """
    if target.sentinels:
        return target.client(max_connections=max_connections)
    plain = target.client()
    pool = aioredis.BlockingConnectionPool(
        connection_class=plain.connection_pool.connection_class,
        max_connections=max_connections,
        timeout=POOL_WAIT_SECONDS,
        **plain.connection_pool.connection_kwargs,
    )
    return aioredis.Redis.from_pool(pool)


def _host_port(entry: str) -> tuple[str, int]:
    host, _, port = entry.rpartition(":")
    return host.strip("[]"), int(port)


def redis_target(cfg: RedisConfig) -> RedisTarget:
    """Resolve ``redis.url``, ``redis.password_file`` and Sentinel settings."""
    try:
        parts = parse_url(cfg.url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"redis.url: {exc}") from None
    password = parts.get("password")
    if cfg.password_file:
        text = read_config_file("redis.password_file", cfg.password_file)
        password = parse_password("redis.password_file", cfg.password_file, text)
    cls = parts.get("connection_class")
    tls = None
    if cls is SSLConnection:
        reqs = str(parts.get("ssl_cert_reqs") or "required").lower()
        if reqs not in _CERT_REQS:
            raise ConfigError(
                f"redis.url: ssl_cert_reqs must be none, optional or required, got {reqs!r}"
            )
        tls = TlsOptions(
            cert_reqs=reqs,
            ca_certs=parts.get("ssl_ca_certs"),
            certfile=parts.get("ssl_certfile"),
            keyfile=parts.get("ssl_keyfile"),
        )
    return RedisTarget(
        host=parts.get("host") or "127.0.0.1",
        port=int(parts.get("port") or 6379),
        path=parts.get("path") if cls is UnixDomainSocketConnection else None,
        db=int(parts.get("db") or 0),
        username=parts.get("username"),
        password=password,
        tls=tls,
        sentinels=tuple(_host_port(s) for s in cfg.sentinels),
        master=cfg.sentinel_master,
    )
