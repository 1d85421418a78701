"""The resume decision, in process: every row of the README's resume table.

What a stream gets before its live events is decided by
:class:`broker.resume.Resume` from the history, the id scheme and the
retained state; no Redis is needed when the history covers the position, so
each row here builds a history, asks for the backlog of a client holding a
given ``Last-Event-ID`` and compares the frames it gets with what the table
promises. (Reading back from a Redis stream is covered end to end in
test_stream_mode.py and test_resume_bounds.py.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from broker.config import Config
from broker.connection import Connection
from broker.envelope import Event, Published
from broker.history import History, RetainedState
from broker.metrics import Stats
from broker.positions import SequenceIds, StreamIds
from broker.resume import MemoryState, Resume, StreamLog

EPOCH = "1700000000000"
CFG = Config()


class Sink(asyncio.Transport):
    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("resume writes nothing itself")

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


@dataclass
class Frame:
    id: str | None
    event: str
    data: str | None

    def json(self) -> Any:
        assert self.data is not None
        return orjson.loads(self.data)


def parse(frames: list[bytes]) -> list[Frame]:
    """Each backlog frame as the WHATWG parser sees it (one block per frame)."""
    out = []
    for raw in frames:
        fields: dict[str, list[str]] = {}
        for line in raw.decode().split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields.setdefault(name, []).append(value)
        data = "\n".join(fields["data"]) if "data" in fields else None
        out.append(Frame(fields.get("id", [None])[-1], fields.get("event", ["message"])[-1], data))
    return out


class World:
    """One process's history and retained state, with events published in order."""

    def __init__(self, *, scheme: SequenceIds | StreamIds, max_events: int = 1000) -> None:
        self.stats = Stats()
        self.history = History(ttl_seconds=3600, max_events=max_events, max_bytes=1 << 30)
        self.retained = RetainedState(max_keys=100, max_bytes=1 << 30, stats=self.stats)
        self.scheme = scheme
        self.seq = 0
        self.resume = Resume(
            history=self.history,
            scheme=scheme,
            state=MemoryState(self.retained),
            stats=self.stats,
            settings=lambda: CFG,
        )

    def id(self, seq: int) -> str:
        return f"p{EPOCH}-{seq}" if isinstance(self.scheme, SequenceIds) else f"{seq}-0"

    def publish(self, channel: str, data: str, **kw: Any) -> Published:
        self.seq += 1
        seq = self.seq if isinstance(self.scheme, SequenceIds) else self.seq << 64
        pub = Published(Event(channel, data, **kw), seq, self.id(self.seq), 0.0)
        self.history.append(pub)
        if pub.event.retain is not None:
            self.retained.apply(pub)
        return pub

    @property
    def position(self) -> tuple[int, str]:
        seq = self.seq if isinstance(self.scheme, SequenceIds) else self.seq << 64
        return seq, self.id(self.seq)

    async def backlog(
        self, last_id: str | None, *, channels: tuple[str, ...] = ("c",), **who: Any
    ) -> list[Frame]:
        conn = Connection(Sink(), chunked=False, channels=channels, **who)
        return parse(await self.resume.backlog(conn, last_id, self.position))


def a_world() -> World:
    """c: 1 a, 2 b (retained "s"), 3 for acme only, 4 for user u only; d: 5 d."""
    world = World(scheme=SequenceIds(EPOCH))
    world.publish("c", "a")
    world.publish("c", "b", retain="s")
    world.publish("c", "acme's", tenant="acme")
    world.publish("c", "u's", users=frozenset({"u"}))
    world.publish("d", "d")
    return world


def datas(frames: list[Frame]) -> list[str | None]:
    return [f.data for f in frames]


async def test_fresh_connection_gets_the_retained_state_then_the_head() -> None:
    world = a_world()
    frames = await world.backlog(None)
    assert datas(frames) == ["b", None]
    assert frames[0].id == world.id(2), "a retained event keeps its own id"
    assert frames[-1].id == world.id(5), "then the head, so the client holds a current position"
    assert world.stats.resets.total() == 0 and world.stats.replays_served == 0


@pytest.mark.parametrize(
    ("last", "who", "missed"),
    [
        (0, {}, ["a", "b"]),
        (1, {}, ["b"]),
        (1, {"tenant": "acme"}, ["b", "acme's"]),
        (1, {"user": "u"}, ["b", "u's"]),
        (1, {"user": "u", "tenant": "acme"}, ["b", "acme's", "u's"]),
        (2, {"tenant": "globex"}, []),
        (4, {"user": "u"}, []),
        (5, {}, []),
    ],
)
async def test_exact_resume_gets_exactly_the_missed_events_it_may_see(
    last: int, who: dict[str, Any], missed: list[str]
) -> None:
    world = a_world()
    frames = await world.backlog(world.id(last), **who)
    assert datas(frames) == missed
    assert all(f.event == "message" for f in frames)
    assert [f.id for f in frames] == sorted(f.id for f in frames if f.id), "in order"
    assert world.stats.replays_served == 1 and world.stats.resets.total() == 0
    assert world.stats.events_replayed == len(missed)


def expect_reset(frames: list[Frame], reason: str, world: World, state: list[str]) -> None:
    reset, *rest = frames
    assert (reset.event, reset.json()["reason"], reset.id) == (
        "broker.reset",
        reason,
        world.id(world.seq),
    )
    assert 0 <= reset.json()["refetch_after_ms"] <= 2 * CFG.sse.retry_ms
    if state:  # retained events carry older ids: the head follows them
        assert datas(rest) == [*state, None] and rest[-1].id == world.id(world.seq)
    else:  # the reset itself carried the head
        assert rest == []
    assert world.stats.resets[reason] == 1 and world.stats.replays_served == 0


async def test_a_channel_that_lost_events_after_the_id_resets_expired() -> None:
    world = World(scheme=SequenceIds(EPOCH), max_events=2)
    world.publish("c", "1", retain="s")
    world.publish("c", "2")
    world.publish("c", "3")  # evicts 1: a client at 0 missed it
    expect_reset(await world.backlog(world.id(0)), "expired", world, ["1"])
    exact = World(scheme=SequenceIds(EPOCH), max_events=2)
    for data in ("1", "2", "3"):
        exact.publish("c", data)
    assert datas(await exact.backlog(exact.id(1))) == ["2", "3"], "nothing after 1 was lost"


async def test_a_quiet_channel_is_not_reset_because_a_noisy_one_evicted() -> None:
    world = World(scheme=SequenceIds(EPOCH), max_events=3)
    world.publish("quiet", "q")
    for i in range(10):
        world.publish("noisy", str(i))
    assert datas(await world.backlog(world.id(0), channels=("quiet",))) == ["q"]
    assert world.stats.resets.total() == 0


@pytest.mark.parametrize(("last", "reset"), [(0, True), (2, True), (3, False), (4, False)])
async def test_resume_across_an_outage_resets_outage(last: int, reset: bool) -> None:
    world = a_world()
    world.history.mark_hole(3)  # events were lost just before position 3
    frames = await world.backlog(world.id(last))
    if reset:
        expect_reset(frames, "outage", world, ["b"])
    else:
        assert world.stats.resets.total() == 0 and world.stats.replays_served == 1


async def test_a_hole_of_other_channels_does_not_reset() -> None:
    world = a_world()
    world.history.mark_hole(4, ["d"])
    assert datas(await world.backlog(world.id(1))) == ["b"]
    other = a_world()
    other.history.mark_hole(4, ["c"])
    expect_reset(await other.backlog(other.id(1)), "outage", other, ["b"])


@pytest.mark.parametrize(
    ("last_id", "reason"),
    [
        ("p1600000000000-1", "epoch"),  # another process start
        (f"{EPOCH}-1", "unknown_id"),  # a stream id (another mode), never a position here
        (f"p{EPOCH}-99", "unknown_id"),  # from the future
        ("not-an-id", "unknown_id"),
        ("", "unknown_id"),
        ("1-2-3", "unknown_id"),
        (f"p{EPOCH}-{'9' * 30}", "unknown_id"),
        (f"p{EPOCH}-1\n", "unknown_id"),
        (f"pp{EPOCH}-1", "unknown_id"),
    ],
)
async def test_ids_that_name_no_position_here_reset(last_id: str, reason: str) -> None:
    world = a_world()
    expect_reset(await world.backlog(last_id), reason, world, ["b"])


async def test_an_open_stream_after_an_outage_gets_the_reset_then_the_state() -> None:
    world = a_world()
    conn = Connection(Sink(), chunked=False, channels=("c",))
    frames = parse(world.resume.gap_frames(conn, "outage", world.id(5), world.position[0]))
    assert frames[0].event == "broker.reset" and frames[0].json()["reason"] == "outage"
    assert datas(frames[1:]) == ["b", None] and frames[-1].id == world.id(5)
    assert conn.last_id == world.id(5)


def stream_world(start: int) -> World:
    world = World(scheme=StreamIds())
    world.resume.stream = StreamLog(lambda: pytest.fail("no Redis read expected"), "s")
    world.resume.stream_start = start << 64
    for data in ("1", "2", "3", "4"):
        world.publish("c", data)
    return world


@pytest.mark.parametrize(
    ("start", "last", "scan"),
    [
        (0, 0, False),  # this instance read the stream from its start
        (0, 2, False),
        (2, 2, False),  # the position is where this instance began: memory covers it
        (2, 1, True),  # older than this instance's memory: read back from Redis
        (0, 9, False),  # ahead of this reader: a catch-up, not a scan
    ],
)
async def test_stream_mode_reads_redis_only_for_positions_older_than_memory(
    start: int, last: int, scan: bool
) -> None:
    world = stream_world(start)
    assert world.resume.needs_scan(("c",), f"{last}-0", world.position[0]) is scan
    assert world.resume.needs_scan(("c",), None, world.position[0]) is False
    assert world.resume.needs_scan(("c",), "junk", world.position[0]) is False
    if not scan and last <= world.seq:
        frames = await world.backlog(f"{last}-0")
        assert datas(frames) == [str(i) for i in range(last + 1, 5)]


@pytest.mark.parametrize("last_id", ["9-0", "p1700000000000-1", "p1-0"])
async def test_stream_mode_ids_from_the_future_or_another_mode_reset_unknown_id(
    last_id: str,
) -> None:
    world = stream_world(0)
    expect_reset(await world.backlog(last_id), "unknown_id", world, [])
