"""``auth.mode = "callback"``: the app decides, with the browser's own credentials.

The broker calls ``GET auth.callback.url?channel=A&channel=B`` forwarding the
client's ``Cookie``, ``Authorization``, ``X-Forwarded-For`` and
``X-Forwarded-Host`` (plus ``X-SSE-Broker-Key``); the app answers
``200 {"user", "tenant", "channels", "ttl"}`` or 401/403. Timeouts, 5xx,
redirects and malformed answers fail closed (503, retryable).
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson

from broker.auth import ANONYMOUS, Credentials, Identity
from broker.auth.backend import AppAuth
from broker.auth.grants import Grants, expand
from broker.config import Config
from broker.errors import Forbidden, Retryable, Unauthorized
from broker.ids import as_id
from broker.metrics import Metrics, Stats

log = logging.getLogger(__name__)


def unavailable(message: str) -> Retryable:
    return Retryable(message, code="auth_unavailable", status=503, reason="auth_unavailable")


def forwarded_headers(creds: Credentials) -> dict[str, str]:
    """The headers that tell the app who the browser is and where it came from."""
    headers: dict[str, str] = {}
    if creds.cookie_header:
        headers["Cookie"] = creds.cookie_header
    if creds.authorization:
        headers["Authorization"] = creds.authorization
    if creds.forwarded_for:
        headers["X-Forwarded-For"] = creds.forwarded_for
    host = creds.forwarded_host or creds.host
    if host:
        headers["X-Forwarded-Host"] = host
    return headers


def _id(value: Any, field: str) -> str | None:
    if value is None or value == "":
        return None

    def refuse(why: str) -> Retryable:
        # The app's answer is broken, not the client: fail closed, retryable.
        log.warning("auth callback answered a bad %r: %s", field, why)
        return unavailable(f"auth callback answered a bad {field!r}")

    return as_id(value, refuse)


class CallbackAuth(AppAuth[Identity]):
    def __init__(self, cfg: Config, stats: Stats, metrics: Metrics) -> None:
        super().__init__("callback", cfg.auth.callback, cfg, stats, metrics.auth_latency)
        self.key = cfg.auth.callback.key

    async def authenticate(self, creds: Credentials, channels: tuple[str, ...]) -> Identity:
        key = self.credentials_key(creds)
        if key is None:
            return ANONYMOUS  # never shares an entry, never calls the app
        cached = self.backend.cached(key)
        if cached is not None and all(cached.grants.allows(c) for c in channels):
            self.stats.auth_calls["cache_hit"] += 1
            return cached
        # Not cached, or cached without one of these channels: ask about them.
        return await self.backend.call(
            (key, channels),
            lambda: self._ask(creds, channels),
            client=creds.client_ip,
            cache_key=key,
        )

    async def _ask(self, creds: Credentials, channels: tuple[str, ...]) -> tuple[Identity, float]:
        headers = forwarded_headers(creds)
        if self.key:
            headers["X-SSE-Broker-Key"] = self.key
        try:
            async with self.session().get(
                self.cfg.url,
                params=[("channel", c) for c in channels],
                headers=headers,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                body = await resp.read() if status == 200 else b""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats.auth_calls["error"] += 1
            # The details (the app's address) are for the operator, not the client.
            log.warning("auth callback failed: %s", exc or type(exc).__name__)
            raise unavailable("the auth backend is unavailable") from None
        if status in (401, 403):
            self.stats.auth_calls["denied"] += 1
            error = Unauthorized if status == 401 else Forbidden
            raise error(f"the app denied access (auth callback answered {status})", code="denied")
        if status != 200:
            self.stats.auth_calls["error"] += 1
            log.warning("auth callback answered %s", status)
            raise unavailable("the auth backend is unavailable")
        self.stats.auth_calls["allowed"] += 1
        return self._identity(body)

    def _identity(self, body: bytes) -> tuple[Identity, float]:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise unavailable("auth callback answered 200 without a JSON body") from None
        if not isinstance(doc, dict):
            raise unavailable("auth callback answered 200 without a JSON object")
        user = _id(doc.get("user"), "user")
        tenant = _id(doc.get("tenant"), "tenant")
        channels = doc.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise unavailable("auth callback answered a bad 'channels': expected strings")
        ttl = doc.get("ttl", self.cfg.cache_ttl_seconds)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl < 0:
            ttl = 0
        grants = Grants.compile(expand([*channels, *self.grants], user, tenant))
        return Identity(user=user, tenant=tenant, grants=grants), float(ttl)
