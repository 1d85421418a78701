"""Asking the app: a bounded cache, coalescing and concurrency caps.

Shared by ``callback`` and ``laravel`` auth. A reconnect storm (a deploy,
the broker restarting) must not flatten the app's PHP-FPM pool: identical
concurrent questions are asked once, answers that allow are cached, and at
most ``max_concurrency`` calls are in flight — beyond that clients get the
retryable refusal and come back after a jittered delay. One client address
may have at most ``auth.max_calls_per_client`` of those calls in flight, so
a few addresses sending random cookies (never cached, never coalesced)
cannot take every slot from everyone else.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import aiohttp
from prometheus_client import Histogram

from broker.auth import Credentials
from broker.config import CallbackConfig, Config, LaravelConfig
from broker.errors import Retryable
from broker.metrics import Stats

T = TypeVar("T")

CACHE_MAX_ENTRIES = 10_000


def credential_key(*parts: str | None) -> str:
    """A hash standing for a client's credentials (cache keys never hold secrets)."""
    h = hashlib.sha256()
    for part in parts:
        # surrogateescape: aiohttp hands non-UTF-8 header bytes over as
        # surrogates; they are hashed as the bytes the client sent.
        h.update(
            b"\x01" if part is None else b"\x02" + part.encode(errors="surrogateescape") + b"\x00"
        )
    return h.hexdigest()


class Backend(Generic[T]):
    """Cache + coalescing + in-flight caps (overall, per client) around one kind of
    call to the app."""

    def __init__(
        self,
        *,
        name: str,
        max_concurrency: int,
        max_per_client: int,
        cache_ttl: float,
        stats: Stats,
        latency: Histogram,
    ) -> None:
        self.name = name
        self.max_concurrency = max_concurrency
        self.max_per_client = max_per_client
        self.cache_ttl = cache_ttl
        self.stats = stats
        self._cache: OrderedDict[Hashable, tuple[float, T]] = OrderedDict()
        self._inflight: dict[Hashable, asyncio.Task[tuple[T, float]]] = {}
        # client address -> calls it started that are still running (no zeros)
        self._per_client: dict[str, int] = {}
        self.latency = latency

    def cached(self, key: Hashable) -> T | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        expires, value = hit
        if expires < time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return value

    def store(self, key: Hashable, value: T, ttl: float) -> None:
        ttl = min(ttl, self.cache_ttl)
        if ttl <= 0:
            return
        self._cache[key] = (time.monotonic() + ttl, value)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_MAX_ENTRIES:
            self._cache.popitem(last=False)

    def forget(self, key: Hashable) -> None:
        self._cache.pop(key, None)

    async def call(
        self,
        key: Hashable,
        ask: Callable[[], Awaitable[tuple[T, float]]],
        *,
        client: str,
        cache_key: Hashable | None = None,
    ) -> T:
        """``ask()`` once for all concurrent callers with the same ``key``; an
        answer that allows is cached under ``cache_key`` (default ``key``).

        ``ask`` returns (value, ttl) for an answer that may be cached; it
        raises for a denial (not cached) or a failure. A new question is
        refused with a retryable error instead of queued when ``client`` (the
        client address) already has ``max_per_client`` calls in flight
        (``auth_client_busy``) or when ``max_concurrency`` calls are in flight
        (``auth_saturated``); joining a question already being asked costs
        the app nothing and is never refused. The call runs in its own task,
        so a client that gives up does not cancel the answer others are
        waiting for; its slot is released when that task ends, however.
        """
        task = self._inflight.get(key)
        if task is not None:
            self.stats.auth_calls["coalesced"] += 1
        else:
            if self._per_client.get(client, 0) >= self.max_per_client:
                raise self._busy(
                    "client_busy",
                    "too many auth calls in flight for this client address: "
                    f"{self.max_per_client} (auth.max_calls_per_client)",
                )
            if len(self._inflight) >= self.max_concurrency:
                raise self._busy(
                    "saturated",
                    f"auth backend busy: {self.max_concurrency} calls in flight "
                    f"(auth.{self.name}.max_concurrency)",
                )
            task = asyncio.create_task(
                self._ask(key, key if cache_key is None else cache_key, ask),
                name=f"auth-{self.name}",
            )
            self._inflight[key] = task
            self._per_client[client] = self._per_client.get(client, 0) + 1
            task.add_done_callback(lambda t: self._finished(t, key, client))
        value, _ = await asyncio.shield(task)
        return value

    def _busy(self, result: str, message: str) -> Retryable:
        """The retryable refusal for a cap on calls (counted by ``result``)."""
        self.stats.auth_calls[result] += 1
        code = "auth_client_busy" if result == "client_busy" else "auth_saturated"
        return Retryable(message, code=code, status=503, reason="auth_unavailable")

    def _finished(self, task: asyncio.Task[tuple[T, float]], key: Hashable, client: str) -> None:
        # A done callback runs whatever happened to the task (even cancelled
        # before it started, when _ask's own cleanup never ran): nothing leaks.
        if self._inflight.get(key) is task:
            del self._inflight[key]
        left = self._per_client.get(client, 0) - 1
        if left > 0:
            self._per_client[client] = left
        else:
            self._per_client.pop(client, None)
        _retrieve(task)

    async def _ask(
        self, key: Hashable, cache_key: Hashable, ask: Callable[[], Awaitable[tuple[T, float]]]
    ) -> tuple[T, float]:
        started = time.monotonic()
        try:
            value, ttl = await ask()
            self.store(cache_key, value, ttl)
            return value, ttl
        finally:
            self._inflight.pop(key, None)
            self.latency.observe(time.monotonic() - started)


class AppAuth(Generic[T]):
    """What ``callback`` and ``laravel`` auth share: the app's endpoint settings, a
    :class:`Backend` answering from cache or by one coalesced call, an HTTP
    client that never keeps the app's cookies (they belong to each browser,
    never to the next client), and the credentials key."""

    def __init__(
        self,
        name: str,
        section: CallbackConfig | LaravelConfig,
        cfg: Config,
        stats: Stats,
        latency: Histogram,
    ) -> None:
        self.cfg = section
        self.grants = cfg.auth.grants
        self.stats = stats
        self.backend: Backend[T] = Backend(
            name=name,
            max_concurrency=section.max_concurrency,
            max_per_client=cfg.auth.max_calls_per_client,
            cache_ttl=section.cache_ttl_seconds,
            stats=stats,
            latency=latency,
        )
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_seconds),
                connector=aiohttp.TCPConnector(limit=self.cfg.max_concurrency),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def credentials_key(self, creds: Credentials) -> str | None:
        """The cache and coalescing key for ``creds``; None without credentials.

        Credentials are ``Authorization`` or one of the ``credential_cookies``.
        The key covers everything forwarded to the app that can change its
        answer: the raw ``Cookie`` header (not the parsed cookies: with a
        cookie sent twice aiohttp keeps the last, PHP the first), the
        ``Authorization``, the host (domain tenancy) and the client address.
        """
        if not creds.authorization and not any(
            name in creds.cookies for name in self.cfg.credential_cookies
        ):
            return None
        return credential_key(
            creds.authorization,
            creds.cookie_header,
            creds.host,
            creds.forwarded_host,
            creds.forwarded_for,
        )

    def verifies(self, key: str) -> bool:
        return False  # no keys: the app is asked again instead (broker.recheck)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _retrieve(task: asyncio.Task[object]) -> None:
    # Every caller may have gone away; the outcome is still consumed.
    if not task.cancelled():
        task.exception()
