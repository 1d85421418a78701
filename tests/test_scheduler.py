"""The shared timer wheel spreads per-connection work over its period."""

from __future__ import annotations

import asyncio
from collections import Counter

from broker.connection import Connection
from broker.scheduler import Wheel


class _Transport(asyncio.Transport):
    """Stand-in for a socket; the wheel never touches it."""


async def test_every_connection_is_visited_once_per_period_in_small_batches() -> None:
    visits: Counter[int] = Counter()
    batches: list[int] = []
    full_turn = asyncio.Event()

    def visit(conns: list[Connection]) -> None:
        batches.append(len(conns))
        for conn in conns:
            visits[id(conn)] += 1
        if len(batches) == 10:
            full_turn.set()
            wheel.stop()

    wheel = Wheel(0.5, visit, tick=0.05)  # 10 slots
    conns = [Connection(_Transport(), chunked=True, channels=("c",)) for _ in range(200)]
    for conn in conns:
        wheel.add(conn)
    wheel.start()
    try:
        await asyncio.wait_for(full_turn.wait(), 5)
    finally:
        wheel.stop()
    assert len(batches) == 10
    assert sorted(visits.values()) == [1] * 200, "each connection once per period"
    assert max(batches) == 20, "never more than 1/slots of the connections per tick"


async def test_removed_connections_are_not_visited() -> None:
    seen: list[Connection] = []
    turned = asyncio.Event()

    def visit(conns: list[Connection]) -> None:
        seen.extend(conns)
        turned.set()

    wheel = Wheel(0.2, visit, tick=0.05)
    keep, drop = (Connection(_Transport(), chunked=True, channels=("c",)) for _ in range(2))
    wheel.add(keep)
    wheel.add(drop)
    wheel.remove(drop)
    wheel.start()
    try:
        await asyncio.wait_for(turned.wait(), 5)
        await asyncio.sleep(0.25)  # a full period more: drop's slot came round too
    finally:
        wheel.stop()
    assert keep in seen and drop not in seen
