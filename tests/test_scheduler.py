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
        if seen.count(keep) == 2:
            turned.set()

    wheel = Wheel(0.2, visit, tick=0.05)
    keep, drop = (Connection(_Transport(), chunked=True, channels=("c",)) for _ in range(2))
    wheel.add(keep)
    wheel.add(drop)
    wheel.remove(drop)
    wheel.start()
    try:
        # keep's second visit is the fence: a full turn passed between its two
        # visits, so every slot came round, drop's too
        await asyncio.wait_for(turned.wait(), 5)
    finally:
        wheel.stop()
    assert keep in seen and drop not in seen


async def test_deadlines_fire_in_order_and_forget_closed_connections() -> None:
    from broker.scheduler import Deadlines

    fired: list[tuple[int, str]] = []
    conns = [Connection(_Transport(), chunked=True, channels=("c",)) for _ in range(10)]
    index = {id(c): i for i, c in enumerate(conns)}
    done = asyncio.Event()

    def fire(conn: Connection, reason: str) -> None:
        fired.append((index[id(conn)], reason))
        if len(fired) == 4:
            done.set()

    deadlines = Deadlines(fire)
    loop = asyncio.get_running_loop()
    now = loop.time()
    for i, conn in enumerate(conns):
        deadlines.add(conn, now + 0.05 + (9 - i) * 0.01, "recycle")
    # most of them close before their time: never fired, and dropped from the heap
    for conn in conns[:6]:
        conn.finish("client_closed")
        deadlines.forget(conn)
    # compacted when half the heap is dead: the sixth's entry waits for the next
    assert deadlines.pending == 5
    await asyncio.wait_for(done.wait(), 5)
    assert fired == [(9, "recycle"), (8, "recycle"), (7, "recycle"), (6, "recycle")]
    deadlines.stop()


async def test_deadlines_heap_is_empty_once_every_stream_closed() -> None:
    from broker.scheduler import Deadlines

    deadlines = Deadlines(lambda conn, reason: None)
    now = asyncio.get_running_loop().time()
    conns = [Connection(_Transport(), chunked=True, channels=("c",)) for _ in range(101)]
    for conn in conns:  # two deadlines each, as a stream with a token has
        deadlines.add(conn, now + 60, "token_expired")
        deadlines.add(conn, now + 1800, "recycle")
    for conn in conns:
        conn.finish("client_closed")
        deadlines.forget(conn)
    assert deadlines.pending == 0
    deadlines.stop()
