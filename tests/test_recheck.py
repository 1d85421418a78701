"""The re-authorization of open streams, in process: who is ended, and how fast the
calls come (the end-to-end tests in test_edge_identity.py run it against real brokers)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker.auth import Credentials, Identity
from broker.auth.grants import Grants
from broker.errors import Forbidden, Retryable, Unauthorized
from broker.recheck import Rechecker, still_authorized


@dataclass(eq=False)
class Conn:
    user: str | None = "u1"
    tenant: str | None = "t1"
    channels: tuple[str, ...] = ("feed",)
    credentials: Credentials | None = field(default_factory=Credentials)
    close_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self.close_reason is not None


@dataclass
class Auth:
    outcome: Any

    async def authenticate(self, creds: Credentials, channels: tuple[str, ...]) -> Identity:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome  # type: ignore[no-any-return]

    def verifies(self, key: str) -> bool:
        return False

    async def close(self) -> None:
        return None


FEED = Grants.compile(["feed"])


@pytest.mark.parametrize(
    ("outcome", "stays"),
    [
        (Identity(user="u1", tenant="t1", grants=FEED), True),
        (Identity(user="u2", tenant="t1", grants=FEED), False),  # the session changed hands
        (Identity(user="u1", tenant="t2", grants=FEED), False),
        (Identity(user="u1", tenant="t1", grants=Grants.compile(["other"])), False),
        (Unauthorized("no", code="denied"), False),  # 401, 419
        (Forbidden("no", code="channel_forbidden"), False),  # 403
        (Unauthorized("a redirect", code="login_redirect"), True),  # not a verdict
        (Retryable("down", code="auth_unavailable", status=503, reason="x"), True),
        (TimeoutError(), True),
        (OSError("reset"), True),
    ],
)
async def test_only_a_definite_no_ends_a_stream(outcome: Any, stays: bool) -> None:
    assert await still_authorized(Auth(outcome), Grants.compile([]), Conn()) is stays  # type: ignore[arg-type]


@pytest.mark.slow
async def test_ten_thousand_streams_are_rechecked_at_a_steady_rate_about_once_per_interval() -> (
    None
):
    interval, tick, n = 2.0, 0.02, 10_000
    checked: dict[Conn, list[float]] = {}
    loop = asyncio.get_running_loop()

    async def check(conn: Conn) -> None:
        checked.setdefault(conn, []).append(loop.time())

    rechecker = Rechecker(interval, check, max_in_flight=10_000, tick=tick)  # type: ignore[arg-type]
    conns = [Conn() for _ in range(n)]
    started = loop.time()
    for conn in conns:
        rechecker.add(conn)  # type: ignore[arg-type]
    closed = conns[:100]
    for conn in closed:
        conn.close_reason = "client_closed"
        rechecker.remove(conn)  # type: ignore[arg-type]
    rechecker.start()
    try:
        await asyncio.sleep(2 * interval + 0.3)
    finally:
        rechecker.stop()
    assert not any(c in checked for c in closed)
    open_conns = conns[100:]
    # every open stream was checked, none before half an interval, and none
    # waited longer than two intervals
    firsts = [checked[c][0] - started for c in open_conns if c in checked]
    assert len(firsts) == len(open_conns)
    assert min(firsts) >= 0.5 * interval - tick
    assert max(firsts) <= 2 * interval
    # never a burst: in any 10 ticks, at most 10 ticks' budget of calls start
    # (one tick of slack: a late tick and the next may fall in one window)
    budget = math.ceil(len(open_conns) * tick / interval)
    times = sorted(t for ts in checked.values() for t in ts)
    window = 10 * tick
    lo = 0
    for hi, t in enumerate(times):
        while times[lo] < t - window:
            lo += 1
        assert hi - lo + 1 <= 11 * budget, f"{hi - lo + 1} calls within {window}s"
