"""Auth backend storms (issue 11, finding 5): a few client addresses sending random
session cookies must not take the app's every auth slot from everyone else.

Random cookies are never cached (denials are not) and never coalesced (each
is another question), so without a per-client bound two requests naming
many ``private-*`` channels filled ``max_concurrency`` and every legitimate
uncached user was refused (``auth_saturated``). Now one client address has
at most ``auth.max_calls_per_client`` calls in flight (beyond: 503
``auth_client_busy``, retryable) and one laravel request names at most
``auth.laravel.max_channels_per_request`` protected channels (beyond: 400
before any call).

Real broker processes, a stand-in app in the test process (both the callback
and Laravel's ``/broadcasting/auth``) that holds every storm call on a gate
and records how many calls it has in flight per client address (the
``X-Forwarded-For`` the broker sends), and clients whose sockets are bound to
other loopback addresses (127.0.0.2 ...), so the broker sees several clients.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import BrokerProcess, StartBroker
from helpers import eventually, get, serve

REAL = "real-user-session"
BOOM = "boom-"  # session cookies with this prefix: the app fails (500)
PER_CLIENT = 4  # auth.max_calls_per_client (the default)
STORM_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
REAL_ADDRESS = "127.0.0.5"
PRIVATE = tuple(f"private-orders.{i}" for i in range(1, 9))  # max_channels_per_request


# -- the stand-in app ---------------------------------------------------------------------------


@dataclass
class StormApp:
    """Allows the ``REAL`` session, denies every other one with 401 (``BOOM``-prefixed
    ones fail with 500). Every call of another session waits for ``gate``."""

    url: str = ""
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: Counter[str] = field(default_factory=Counter)  # by client address
    sessions: Counter[str] = field(default_factory=Counter)  # in flight, by session cookie
    peak: Counter[str] = field(default_factory=Counter)
    peak_total: int = 0
    calls: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.gate.set()

    async def total_in_flight(self) -> int:
        return sum(self.in_flight.values())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            await request.post()
        client = request.headers.get("X-Forwarded-For", "?").split(",")[-1].strip()
        session = request.cookies.get("laravel_session", "")
        self.calls[client] += 1
        self.in_flight[client] += 1
        self.sessions[session] += 1
        self.peak[client] = max(self.peak[client], self.in_flight[client])
        self.peak_total = max(self.peak_total, sum(self.in_flight.values()))
        try:
            if session == REAL:
                if request.method == "POST":  # Broadcast::routes(), a private channel
                    return web.Response(body=b"true", content_type="application/json")
                return web.json_response({"user": "real", "channels": ["private-*"]})
            await self.gate.wait()
            if session.startswith(BOOM):
                return web.json_response({"message": "Server Error"}, status=500)
            return web.json_response({"message": "Unauthenticated."}, status=401)
        finally:
            self.in_flight[client] -= 1
            self.sessions[session] -= 1
            if not self.sessions[session]:
                del self.sessions[session]


@pytest.fixture
async def app() -> AsyncIterator[StormApp]:
    fake = StormApp()
    web_app = web.Application()
    web_app.router.add_get("/auth", fake.handle)
    web_app.router.add_post("/broadcasting/auth", fake.handle)
    async with serve(web_app) as fake.url:
        try:
            yield fake
        finally:
            fake.gate.set()


async def laravel_broker(start_broker: StartBroker, app: StormApp, *sets: str) -> BrokerProcess:
    return await start_broker(
        "auth.mode=laravel",
        f"auth.laravel.url={app.url}/broadcasting/auth",
        "auth.laravel.max_concurrency=16",
        *sets,
    )


async def callback_broker(start_broker: StartBroker, app: StormApp, *sets: str) -> BrokerProcess:
    return await start_broker(
        "auth.mode=callback",
        f"auth.callback.url={app.url}/auth",
        "auth.callback.max_concurrency=10",
        *sets,
    )


# -- clients on other addresses -------------------------------------------------------------------


@pytest.fixture
async def clients() -> AsyncIterator[dict[str, aiohttp.ClientSession]]:
    """One HTTP client per source address (its sockets bound to that loopback address)."""
    sessions = {
        address: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(address, 0), limit=0)
        )
        for address in (*STORM_ADDRESSES, REAL_ADDRESS)
    }
    try:
        yield sessions
    finally:
        for client in sessions.values():
            await client.close()


def cookie(session: str) -> dict[str, str]:
    return {"Cookie": f"laravel_session={session}"}


def random_cookie(prefix: str = "") -> dict[str, str]:
    return cookie(prefix + secrets.token_hex(16))


def outcome(result: tuple[int, Any, Any]) -> str:
    """``200``, ``401``, or ``503 <error code>``."""
    status, body, _ = result
    if status == 503 and isinstance(body, dict):
        return f"503 {body.get('error')}"
    return str(status)


async def storm(
    app: StormApp,
    clients: dict[str, aiohttp.ClientSession],
    url: str,
    addresses: Iterable[str],
    per_address: int,
) -> list[asyncio.Task[tuple[int, Any, Any]]]:
    """``per_address`` concurrent requests with random cookies from each address, the app
    holding their calls; returns once every request was either refused or has its
    calls held by the app."""
    app.gate.clear()
    tasks = [
        asyncio.create_task(get(clients[address], url, random_cookie()))
        for address in addresses
        for _ in range(per_address)
    ]

    async def settled() -> tuple[int, int]:
        return sum(not t.done() for t in tasks), len(app.sessions)

    # A request the broker has not decided about yet is waiting without a call
    # in the app: while there is one, more requests wait than sessions are held.
    await eventually(settled, lambda s: s[0] == s[1] > 0)
    return tasks


async def ends(tasks: list[asyncio.Task[tuple[int, Any, Any]]]) -> Counter[str]:
    return Counter(outcome(r) for r in await asyncio.gather(*tasks))


async def refused(broker: BrokerProcess, reason: str) -> float:
    return await broker.metric("sse_broker_requests_refused_total", {"reason": reason}) or 0


def closed_first_to(port: int) -> set[tuple[str, str]]:
    """Connections to ``port`` that this side closed first and the other side closed
    too: the (local, peer) of our sockets in TIME-WAIT."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "time-wait", f"dport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {(line.split()[2], line.split()[3]) for line in out.splitlines()}


async def backend_calls(broker: BrokerProcess, result: str) -> float:
    return await broker.metric("sse_broker_auth_backend_calls_total", {"result": result}) or 0


async def full_share_again(
    app: StormApp,
    clients: dict[str, aiohttp.ClientSession],
    url: str,
    addresses: Iterable[str],
) -> None:
    """From each address, ``max_calls_per_client`` requests (one call each, ``url``)
    held at once by the app: none is refused, all are denied once the app answers."""
    addresses = tuple(addresses)
    app.gate.clear()
    tasks = [
        asyncio.create_task(get(clients[a], url, random_cookie()))
        for a in addresses
        for _ in range(PER_CLIENT)
    ]
    try:
        # (a refusal ends the wait early: the assertion below names it)
        await eventually(
            app.total_in_flight,
            lambda n: n == len(addresses) * PER_CLIENT or any(t.done() for t in tasks),
        )
    finally:
        app.gate.set()
    assert await ends(tasks) == {"401": len(tasks)}


# -- laravel --------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_laravel_request_naming_too_many_protected_channels_is_400_without_a_call(
    start_broker: StartBroker, app: StormApp, clients: dict[str, aiohttp.ClientSession]
) -> None:
    broker = await laravel_broker(start_broker, app)
    http = clients[REAL_ADDRESS]
    nine = (*PRIVATE, "presence-chat.1")
    for headers in (cookie(REAL), random_cookie(), {}):
        status, body, _ = await get(http, broker.events_url(*nine, "news"), headers)
        assert status == 400, body
        assert body["error"] == "too_many_protected_channels", body
        assert "auth.laravel.max_channels_per_request is 8" in body["message"], body
    assert not app.calls
    assert await refused(broker, "too_many_protected_channels") == 3
    # eight are fine, public ones beside them do not count, and a request naming
    # more than max_calls_per_client of them passes at once: it asks about at
    # most that many at a time
    assert (await get(http, broker.events_url(*PRIVATE, "news"), cookie(REAL)))[0] == 200
    assert app.calls[REAL_ADDRESS] == 8
    assert app.peak[REAL_ADDRESS] <= PER_CLIENT
    # the key is honoured
    smaller = await laravel_broker(start_broker, app, "auth.laravel.max_channels_per_request=2")
    status, body, _ = await get(http, smaller.events_url(*PRIVATE[:3]), cookie(REAL))
    assert (status, body["error"]) == (400, "too_many_protected_channels")
    assert app.calls[REAL_ADDRESS] == 8


@pytest.mark.slow
async def test_laravel_storm_of_random_cookies_does_not_refuse_a_real_user(
    start_broker: StartBroker, app: StormApp, clients: dict[str, aiohttp.ClientSession]
) -> None:
    broker = await laravel_broker(start_broker, app)
    url = broker.events_url(*PRIVATE)
    tasks = await storm(app, clients, url, STORM_ADDRESSES, per_address=12)
    try:
        # while the storm's calls are held: a user from elsewhere is let in
        real = await get(clients[REAL_ADDRESS], broker.events_url("private-orders.1"), cookie(REAL))
        assert outcome(real) == "200", real[1]
        assert app.calls[REAL_ADDRESS] == 1
    finally:
        app.gate.set()
    ends_by_outcome = await ends(tasks)
    # the storm got denials (the calls it was allowed) and retryable refusals
    assert set(ends_by_outcome) <= {"401", "503 auth_client_busy"}, ends_by_outcome
    assert ends_by_outcome["503 auth_client_busy"] >= 3 * 10, ends_by_outcome
    assert await refused(broker, "auth_client_busy") == ends_by_outcome["503 auth_client_busy"]
    assert await refused(broker, "auth_saturated") == 0
    assert all(app.peak[a] <= PER_CLIENT for a in STORM_ADDRESSES), app.peak
    assert app.peak_total <= len(STORM_ADDRESSES) * PER_CLIENT + 1, app.peak_total
    # the counters are back at zero: each address may again have its full
    # share of calls in flight at once (a leaked slot would refuse the last)
    await full_share_again(app, clients, broker.events_url("private-orders.1"), STORM_ADDRESSES)


# -- callback -------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_callback_storm_of_random_cookies_does_not_refuse_a_real_user(
    start_broker: StartBroker, app: StormApp, clients: dict[str, aiohttp.ClientSession]
) -> None:
    # two storm addresses may hold 2 x 4 of the 10 calls; without the per-client
    # bound they would hold all 10
    broker = await callback_broker(start_broker, app)
    url = broker.events_url("private-feed")
    storming = STORM_ADDRESSES[:2]
    tasks = await storm(app, clients, url, storming, per_address=10)
    try:
        real = await get(clients[REAL_ADDRESS], url, cookie(REAL))
        assert outcome(real) == "200", real[1]
        assert len(app.sessions) == len(storming) * PER_CLIENT
        # another address still has its own share
        other = await get(clients[STORM_ADDRESSES[2]], url, cookie(REAL))
        assert outcome(other) == "200", other[1]
    finally:
        app.gate.set()
    ends_by_outcome = await ends(tasks)
    assert ends_by_outcome == {"401": 2 * PER_CLIENT, "503 auth_client_busy": 2 * 6}
    assert await refused(broker, "auth_saturated") == 0
    assert all(app.peak[a] <= PER_CLIENT for a in storming), app.peak
    await full_share_again(app, clients, url, storming)


@pytest.mark.slow
async def test_per_client_slots_are_released_whatever_ends_the_call(
    start_broker: StartBroker, app: StormApp, clients: dict[str, aiohttp.ClientSession]
) -> None:
    """Denied, failed (500), timed out, or abandoned by a client that hung up: every
    call gives its slot back."""
    broker = await callback_broker(start_broker, app, "auth.callback.timeout_seconds=1")
    url = broker.events_url("private-feed")
    assert broker.url is not None
    port = int(broker.url.rsplit(":", 1)[1])
    address = STORM_ADDRESSES[0]
    http = clients[address]
    for attempt in range(1, 3):
        app.gate.clear()
        denied = asyncio.create_task(get(http, url, random_cookie()))
        failed = asyncio.create_task(get(http, url, random_cookie(BOOM)))
        abandoned = [asyncio.create_task(get(http, url, random_cookie())) for _ in range(2)]
        await eventually(app.total_in_flight, lambda n: n == PER_CLIENT)
        status, body, _ = await get(http, url, random_cookie())
        assert (status, body["error"]) == (503, "auth_client_busy")
        closed_before = closed_first_to(port)
        for task in abandoned:  # the browsers go away while the app thinks
            task.cancel()
        await asyncio.gather(*abandoned, return_exceptions=True)
        # The hang-ups reached the broker before the app answers, so their calls end
        # with nobody waiting: it closed its end of both (ours are in TIME-WAIT only
        # then), which it does as it drops their requests.
        await eventually(
            lambda before=closed_before: asyncio.sleep(0, len(closed_first_to(port) - before)),
            lambda n: n >= 2,  # both abandoned calls
        )
        app.gate.set()
        assert outcome(await denied) == "401"
        assert outcome(await failed) == "503 auth_unavailable"
        # the abandoned calls are answered too (denied), slots given back
        denials = 3 * attempt
        await eventually(lambda: backend_calls(broker, "denied"), lambda n, d=denials: n == d)
    # a call the app never answers times out
    app.gate.clear()
    timed_out = await get(http, url, random_cookie())
    assert outcome(timed_out) == "503 auth_unavailable"
    app.gate.set()
    await full_share_again(app, clients, url, [address])
