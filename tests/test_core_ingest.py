"""The ingest's contract with the core, in process: health states, several
sources read as one, per-channel positions and gaps.

The real ingests against a real Redis are tested end to end in
test_resilience.py, test_stream_mode.py and test_redis_production.py; here
the rules they rely on are checked row by row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import pytest

from broker.envelope import Event, Published
from broker.errors import Rejected
from broker.health import Health, State
from broker.history import History
from broker.ingest import Sink, Sources
from broker.metrics import Stats
from broker.positions import Scalar, SequenceIds, StreamIds, Vector, previous_id, stream_seq

# -- health: one state, every transition --------------------------------------------

# (steps, final state, readiness reason, reconnects counted)
HEALTH_ROWS = [
    ([], State.STARTING, "starting", 0),
    (["lost"], State.STARTING, "starting", 0),
    (["up"], State.UP, None, 0),
    (["up", "lost"], State.DOWN, "redis_unavailable", 0),
    (["up", "lost", "up"], State.UP, None, 1),
    (["up", "unreachable"], State.UNREACHABLE, "redis_unavailable", 0),
    (["up", "unreachable", "reachable"], State.UP, None, 1),
    # the reader rode the outage out while the check saw it: one reconnect
    (["up", "unreachable", "lost", "up", "reachable"], State.UP, None, 1),
    # a check reaching Redis does not bring back a reader that lost its connection
    (["up", "lost", "reachable"], State.DOWN, "redis_unavailable", 0),
    (["up", "stalled"], State.STALLED, "ingest_stalled", 0),
    # rebuilt on purpose: losing the wedged connection keeps it stalled...
    (["up", "stalled", "lost"], State.STALLED, "ingest_stalled", 0),
    # ...and a fresh subscription is not yet proof that it moves
    (["up", "stalled", "lost", "up"], State.STALLED, "ingest_stalled", 1),
    (["up", "stalled", "lost", "up", "moving"], State.UP, None, 1),
    (["up", "moving"], State.UP, None, 0),
    (["up", "up"], State.UP, None, 0),
]


@pytest.mark.parametrize(("steps", "state", "reason", "reconnects"), HEALTH_ROWS)
async def test_health_states(
    steps: list[str], state: State, reason: str | None, reconnects: int
) -> None:
    stats = Stats()
    rebuilt = []
    health = Health(stats, lambda: rebuilt.append(1))
    actions = {
        "up": lambda: health.connected(True),
        "lost": lambda: health.connected(False),
        "unreachable": lambda: health.reachable(False, "refused"),
        "reachable": lambda: health.reachable(True),
        "stalled": lambda: health.stalled("test"),
        "moving": health.moving,
    }
    for step in steps:
        actions[step]()
    assert (health.state, health.reason(), stats.redis_reconnects) == (state, reason, reconnects)
    assert len(rebuilt) == steps.count("stalled"), "a stall rebuilds the ingest"
    assert health.first_up.is_set() is ("up" in steps)


@pytest.mark.parametrize(
    ("steps", "gap"),
    [(["up"], False), (["up", "lost", "up"], True), (["up", "stalled", "up"], True)],
)
async def test_connected_again_says_whether_it_ends_a_loss(steps: list[str], gap: bool) -> None:
    health = Health(Stats(), lambda: None)
    results = []
    for step in steps:
        if step == "stalled":
            health.stalled("test")
        else:
            results.append(health.connected(step == "up"))
    assert results[-1] is gap


# -- several sources as one ------------------------------------------------------------


class Recorder:
    """A sink that records the health reports it gets."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def message(self, channel: str, payload: bytes) -> None:
        self.seen.append(("message", channel))

    def entry(self, id: str, fields: dict[bytes, bytes]) -> None:
        self.seen.append(("entry", id))

    def reject(self, channel: str, exc: Rejected) -> None:
        self.seen.append(("reject", channel))

    def started(self, id: str) -> None:
        self.seen.append(("started", id))

    async def settle(self) -> None:
        self.seen.append("settle")

    def connected(self, up: bool) -> None:
        self.seen.append(("connected", up))

    def reachable(self, up: bool, detail: str = "") -> None:
        self.seen.append(("reachable", up))

    def stalled(self, why: str) -> None:
        self.seen.append(("stalled", why))

    def moving(self) -> None:
        self.seen.append("moving")

    def gap(
        self, reason: str, channels: Collection[str] | None = None, upto: str | None = None
    ) -> None:
        self.seen.append(("gap", reason, channels))


class Scripted:
    """An ingest that replays a script of sink calls, one per step it is let through."""

    scheme = StreamIds()
    stream_key = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self.subscribed = False
        self.subscribes: list[str] = []

    async def run(self, sink: Sink) -> None:
        while True:
            what, arg = await self.steps.get()
            if what == "connected":
                self.subscribed = bool(arg)
                sink.connected(bool(arg))
            elif what == "message":
                sink.message(str(arg), b"{}")
            self.steps.task_done()

    async def check(self, sink: Sink) -> None:
        sink.moving()

    async def subscribe(self, channels: Collection[str]) -> None:
        self.subscribes.extend(channels)

    def release(self, channel: str) -> None:
        self.subscribes.remove(channel)

    async def close(self) -> None:
        return None


async def test_several_sources_are_connected_only_while_all_are() -> None:
    a, b = Scripted("a"), Scripted("b")
    both = Sources(a, b)
    sink = Recorder()
    task = asyncio.create_task(both.run(sink))

    async def step(source: Scripted, what: str, arg: object) -> None:
        await source.steps.put((what, arg))
        await source.steps.join()

    await step(a, "connected", True)
    assert (sink.seen, both.subscribed) == ([], False), "one of two is not connected"
    await step(b, "connected", True)
    assert (sink.seen, both.subscribed) == ([("connected", True)], True)
    await step(a, "message", "x")
    await step(b, "connected", False)
    await step(a, "connected", False)
    await step(a, "connected", True)
    await step(b, "connected", True)
    assert sink.seen == [
        ("connected", True),
        ("message", "x"),
        ("connected", False),
        ("connected", True),
    ]
    await both.subscribe(["orders"])
    assert a.subscribes == b.subscribes == ["orders"]
    both.release("orders")
    assert a.subscribes == b.subscribes == []
    await both.check(sink)
    assert sink.seen[-2:] == ["moving", "moving"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- positions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_id", "parsed"),
    [
        ("p1700000000000-5", 5),
        ("p1700000000001-5", "epoch"),
        ("1700000000000-5", "unknown_id"),  # a stream id: another mode's position
        ("p1700000000000-", "unknown_id"),
        ("p-5", "unknown_id"),
        ("p1700000000000-18446744073709551616", "unknown_id"),  # past u64
        ("x", "unknown_id"),
        ("", "unknown_id"),
    ],
)
def test_sequence_ids(last_id: str, parsed: int | str) -> None:
    assert SequenceIds("1700000000000").parse(last_id) == parsed


@pytest.mark.parametrize(
    ("last_id", "parsed"),
    [
        ("0-0", 0),
        ("1-0", 1 << 64),
        ("5-7", (5 << 64) | 7),
        ("5", "unknown_id"),
        ("5-7-1", "unknown_id"),
        ("18446744073709551616-0", "unknown_id"),
        ("p5-7", "unknown_id"),  # a pub/sub id: another mode's position
    ],
)
def test_stream_ids(last_id: str, parsed: int | str) -> None:
    assert StreamIds().parse(last_id) == parsed


@pytest.mark.parametrize(
    ("id", "before"), [("5-7", "5-6"), ("5-0", "4-18446744073709551615"), ("0-0", "0-0")]
)
def test_previous_id_is_the_greatest_id_before(id: str, before: str) -> None:
    assert previous_id(id) == before
    if id != "0-0":
        assert stream_seq(before) == (stream_seq(id) or 0) - 1


def pub(channel: str, seq: int) -> Published:
    return Published(Event(channel, str(seq)), seq, str(seq), 0.0)


def test_a_vector_position_is_compared_per_channel() -> None:
    """Two partitions (a channel lives in the one named by its first letter): a client
    at a=2, b=10 missed a's 3 and b's 11, not b's 9."""
    history = History(ttl_seconds=60, max_events=100, max_bytes=1 << 30)
    for channel, seq in (("a1", 1), ("a1", 2), ("b1", 9), ("a1", 3), ("b1", 10), ("b1", 11)):
        history.append(pub(channel, seq))

    def partition(channel: str) -> str:
        return channel[0]

    at = Vector({"a": 2, "b": 10}, partition)
    head = Vector({"a": 3, "b": 11}, partition)
    assert [p.seq for p in history.since(["a1", "b1"], at, head)] == [3, 11]
    assert history.lost_after(["a1", "b1"], at) is None
    history.mark_hole(10, ["b1"])  # b's partition lost events before 10
    assert history.lost_after(["a1"], at) is None
    assert history.lost_after(["b1"], Vector({"b": 9}, partition)) == "outage"
    assert history.lost_after(["b1"], at) is None, "a=2 is behind 10 only in another partition"
    assert Scalar(4).at("anything") == 4
    assert at.at("c1") == 0, "a partition the client never saw: from its start"
