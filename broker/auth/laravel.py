"""``auth.mode = "laravel"``: a drop-in for Laravel's own ``Broadcast::routes()``.

For each requested ``private-*``/``presence-*`` channel the broker POSTs the
form ``channel_name``, ``socket_id`` to ``auth.laravel.url`` (the app's
existing ``/broadcasting/auth``) exactly as Laravel Echo would from the
browser: the browser's ``Cookie`` and ``Authorization``, ``X-XSRF-TOKEN``
from the ``XSRF-TOKEN`` cookie, ``X-Requested-With: XMLHttpRequest`` and the
original ``Host`` (domain-based tenancy). A 2xx allows only when its body is
an answer a broadcaster gives (see :func:`_answer_user`); 3xx (a redirect to
the login page), 401, 403 and 419 (CSRF/session expired) deny; anything else
fails closed. A presence answer's ``channel_data.user_id`` becomes the user.
Every other channel is public.

One request names at most ``auth.laravel.max_channels_per_request`` protected
channels (each is a call to the app; more is a 400 before any call), and asks
about at most ``auth.max_calls_per_client`` of them at a time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson

from broker.auth import Credentials, Identity
from broker.auth.backend import AppAuth
from broker.auth.callback import forwarded_headers, unavailable
from broker.auth.grants import PROTECTED, Grants, escape_glob
from broker.config import Config
from broker.errors import BadRequest, Forbidden, Unauthorized
from broker.ids import as_id
from broker.metrics import Metrics, Stats

log = logging.getLogger(__name__)

DENY = frozenset({401, 403, 419})


class NotAnAuthAnswer(ValueError):
    """A 2xx from the auth URL that is not one of the answers a broadcaster gives."""


def _answer_user(body: bytes, presence: bool) -> str:
    """The user a 2xx answer vouches for ("" when it names none), or NotAnAuthAnswer.

    Accepted, and nothing else: ``true`` (Laravel's Redis broadcaster, private
    channels), an object with a string ``auth`` (Pusher and Reverb
    broadcasters), or an object whose ``channel_data`` (an object, or a JSON
    string as Pusher-style broadcasters send it) has a valid ``user_id``.
    A presence channel needs ``channel_data``. An SPA fallback page, a
    maintenance page or an empty 204 is not an answer: it must never open a
    channel.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise NotAnAuthAnswer("not JSON") from None
    if doc is True and not presence:
        return ""
    if not isinstance(doc, dict):
        raise NotAnAuthAnswer("expected true or a JSON object")
    if "channel_data" not in doc:
        if presence:
            raise NotAnAuthAnswer("a presence channel needs 'channel_data'")
        if isinstance(doc.get("auth"), str):
            return ""
        raise NotAnAuthAnswer("an object without a string 'auth' or a 'channel_data'")
    data: Any = doc["channel_data"]
    if isinstance(data, str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise NotAnAuthAnswer("'channel_data' is a string but not JSON") from None
    if not isinstance(data, dict):
        raise NotAnAuthAnswer("'channel_data' is not an object")
    return as_id(data.get("user_id"), lambda why: NotAnAuthAnswer(f"'channel_data.user_id': {why}"))


class LaravelAuth(AppAuth[str]):
    """Allowed answers are cached per credentials and channel; the cached value is
    the presence user id ("" for a private channel)."""

    def __init__(self, cfg: Config, stats: Stats, metrics: Metrics) -> None:
        super().__init__("laravel", cfg.auth.laravel, cfg, stats, metrics.auth_latency)
        self.max_channels = cfg.auth.laravel.max_channels_per_request

    async def authenticate(self, creds: Credentials, channels: tuple[str, ...]) -> Identity:
        protected = [c for c in channels if c.startswith(PROTECTED)]
        public = [escape_glob(c) for c in channels if not c.startswith(PROTECTED)]
        if not protected:
            return Identity(grants=Grants.compile(public))
        if len(protected) > self.max_channels:
            # One call each: a request may not order a burst of calls at will.
            raise BadRequest(
                f"{len(protected)} private/presence channels requested; "
                f"auth.laravel.max_channels_per_request is {self.max_channels}",
                code="too_many_protected_channels",
            )
        session = self.credentials_key(creds)
        if session is None:
            # No session: nothing to ask the app about.
            raise Unauthorized(
                f"channel {protected[0]!r} requires a session", code="credentials_required"
            )
        users = await self._all_allowed(creds, session, protected)
        user = next((u for u in users if u), None)
        return Identity(
            user=user,
            grants=Grants.compile([*public, *(escape_glob(c) for c in protected)]),
        )

    async def _all_allowed(self, creds: Credentials, key: str, channels: list[str]) -> list[str]:
        """Each channel's answer, in order; raises the first refusal.

        At most ``auth.max_calls_per_client`` of one request's calls run at
        once, so a request naming more channels than that still passes
        without help from a retry. After the first refusal no further call
        is started for this request (those running finish; allowed answers
        are cached for the retry).
        """
        limit = asyncio.Semaphore(self.backend.max_per_client)

        async def one(channel: str) -> str:
            async with limit:
                return await self._allowed(creds, key, channel)

        tasks = [asyncio.create_task(one(c)) for c in channels]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _allowed(self, creds: Credentials, key: str, channel: str) -> str:
        cached = self.backend.cached((key, channel))
        if cached is not None:
            self.stats.auth_calls["cache_hit"] += 1
            return cached
        return await self.backend.call(
            (key, channel), lambda: self._ask(creds, channel), client=creds.client_ip
        )

    async def _ask(self, creds: Credentials, channel: str) -> tuple[str, float]:
        headers = forwarded_headers(creds)
        headers["X-Requested-With"] = "XMLHttpRequest"
        headers["Accept"] = "application/json"
        if creds.host:
            headers["Host"] = creds.host  # domain-based tenancy sees the browser's host
        xsrf = creds.cookies.get("XSRF-TOKEN")
        if xsrf:
            headers["X-XSRF-TOKEN"] = unquote(xsrf)
        form = {"channel_name": channel, "socket_id": creds.socket_id or "0.0"}
        try:
            async with self.session().post(
                self.cfg.url, data=form, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                body = await resp.read() if 200 <= status < 300 else b""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats.auth_calls["error"] += 1
            log.warning("laravel auth failed: %s", exc or type(exc).__name__)
            raise unavailable("the auth backend is unavailable") from None
        if 200 <= status < 300:
            try:
                user = _answer_user(body, channel.startswith("presence-"))
            except NotAnAuthAnswer as exc:
                # A catch-all route answered, not the broadcaster: fail closed.
                self.stats.auth_calls["error"] += 1
                log.warning(
                    "laravel auth answered %s for %r without an auth answer (%s): "
                    "is auth.laravel.url Broadcast::routes()?",
                    status,
                    channel,
                    exc,
                )
                raise unavailable("the auth backend gave no valid answer") from None
            self.stats.auth_calls["allowed"] += 1
            return user, float(self.cfg.cache_ttl_seconds)
        if status in DENY or 300 <= status < 400:
            self.stats.auth_calls["denied"] += 1
            if status == 403:
                raise Forbidden(f"the app denied channel {channel!r}", code="channel_forbidden")
            # A redirect (to the login page, or to https) is a refusal now but
            # not a verdict on an open stream (broker.recheck keeps it).
            raise Unauthorized(
                f"the app refused the session for {channel!r} (answered {status})",
                code="denied" if status in DENY else "login_redirect",
            )
        self.stats.auth_calls["error"] += 1
        log.warning("laravel auth answered %s", status)
        raise unavailable("the auth backend is unavailable")
