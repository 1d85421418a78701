"""The hub's core in process (broker/hub.py over broker/connection.py): no Redis, no sockets.

Each connection writes to a :class:`FakeTransport` that records every
``write`` call, so the tests see exactly what a client would receive and in
how many writes. Expected bytes are built here from the SSE and HTTP/1.1
chunk rules, not by the broker's encoder. The hub flushes with
``loop.call_soon``; :func:`tick` lets one loop iteration run (no sleeping).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from broker import hub as hub_module
from broker.connection import Connection
from broker.envelope import Event, Published
from broker.hub import Hub
from broker.metrics import Metrics, Stats

NO_LIMIT = 10**9
TIMEOUT = 30.0


class FakeTransport(asyncio.Transport):
    """A socket's stand-in: records writes; a peer that is not ``reading`` lets them pile up."""

    def __init__(self, *, reading: bool = True) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.reading = reading
        self.unsent = 0
        self.closing = False
        self.aborted = False
        self.writes_after_close = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            self.writes_after_close += 1
        self.writes.append(bytes(data) if not isinstance(data, bytes) else data)
        if not self.reading:
            self.unsent += len(data)

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.aborted = self.closing = True
        self.unsent = 0

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no "socket": Connection skips its socket options

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


class Scene:
    """A hub, its connections by name, and what the hub recorded and retained."""

    def __init__(
        self, *, write_buffer_bytes: int = NO_LIMIT, write_timeout: float = TIMEOUT
    ) -> None:
        self.stats = Stats()
        self.recorded: list[Published] = []
        self.retained: list[Published] = []
        self.hub = Hub(
            stats=self.stats,
            metrics=Metrics(self.stats, dict),
            write_buffer_bytes=write_buffer_bytes,
            write_timeout=write_timeout,
            record=self.recorded.append,
            retain=self.retained.append,
        )
        self.conns: dict[str, Connection] = {}
        self.published = 0

    def open(
        self,
        name: str,
        channels: tuple[str, ...] = ("c",),
        *,
        chunked: bool = False,
        user: str | None = None,
        tenant: str | None = None,
        socket_id: str | None = None,
        started: bool = True,
        reading: bool = True,
    ) -> Connection:
        conn = Connection(
            FakeTransport(reading=reading),
            chunked=chunked,
            channels=channels,
            user=user,
            tenant=tenant,
            remote=name,
            socket_id=socket_id,
        )
        self.hub.add(conn)
        if started:
            self.hub.start(conn)
        self.conns[name] = conn
        return conn

    def publish(self, channel: str, data: str, **fields: Any) -> Published:
        self.published += 1
        return self.hub.publish(Event(channel, data, **fields))

    def event_id(self, n: int) -> str:
        """The id of the ``n``-th event published (one sequence across channels)."""
        return f"p{self.hub.epoch}-{n}"

    def transport(self, name: str) -> FakeTransport:
        transport = self.conns[name].transport
        assert isinstance(transport, FakeTransport)
        return transport

    def writes(self, name: str) -> list[bytes]:
        return self.transport(name).writes


async def tick() -> None:
    """Let one loop iteration run: the flush scheduled with ``call_soon`` happens."""
    await asyncio.sleep(0)


def sse_frame(id: str | None, data: str, event: str | None = None) -> bytes:
    """An SSE event block, spelled out from the format (not by broker.sse)."""
    lines = [] if id is None else [f"id: {id}"]
    if event is not None:
        lines.append(f"event: {event}")
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


def control(label: str) -> bytes:
    """A connection-specific frame as the app builds them (no id)."""
    return sse_frame(None, label, event="ctl")


def dechunk(data: bytes) -> list[bytes]:
    """The payloads of HTTP/1.1 chunks, checking the framing strictly; no last chunk allowed."""
    payloads = []
    rest = data
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        assert sep, f"chunk size line without CRLF: {size_line!r}"
        assert size_line == size_line.lower() and size_line.isalnum(), size_line
        size = int(size_line, 16)
        assert size > 0, "a zero-size chunk ends the response"
        payload, crlf, rest = rest[:size], rest[size : size + 2], rest[size + 2 :]
        assert len(payload) == size and crlf == b"\r\n", (size, payload, crlf)
        payloads.append(payload)
    return payloads


def as_chunk(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


# -- filtering: who receives which event -----------------------------------------------


AUDIENCE = {
    # name: (channels, user, tenant, socket_id)
    "anon": (("c",), None, None, None),
    "alice@acme": (("c",), "alice", "acme", "s1"),
    "bob@acme": (("c",), "bob", "acme", "s2"),
    "alice@globex": (("c",), "alice", "globex", "s3"),
    "nobody@acme": (("c",), None, "acme", None),
    "carol@acme/other": (("other",), "carol", "acme", "s4"),
    "dave/both": (("c", "other"), "dave", None, "s5"),
}
ON_C = {"anon", "alice@acme", "bob@acme", "alice@globex", "nobody@acme", "dave/both"}


@pytest.mark.parametrize(
    ("channel", "fields", "receivers"),
    [
        pytest.param("c", {}, ON_C, id="unrestricted: every subscriber of the channel"),
        pytest.param(
            "c", {"tenant": "acme"}, {"alice@acme", "bob@acme", "nobody@acme"}, id="tenant"
        ),
        pytest.param("c", {"tenant": "initech"}, set(), id="tenant nobody holds"),
        pytest.param(
            "c", {"users": frozenset({"alice"})}, {"alice@acme", "alice@globex"}, id="users"
        ),
        pytest.param(
            "c",
            {"users": frozenset({"alice", "bob", "zed"})},
            {"alice@acme", "bob@acme", "alice@globex"},
            id="several users",
        ),
        pytest.param("c", {"users": frozenset()}, set(), id="empty user list: nobody"),
        pytest.param(
            "c",
            {"users": frozenset({"alice"}), "tenant": "acme"},
            {"alice@acme"},
            id="users and tenant: both must match",
        ),
        pytest.param(
            "c",
            {"users": frozenset({"bob"}), "tenant": "globex"},
            set(),
            id="user of another tenant",
        ),
        pytest.param(
            "c", {"socket": "s1"}, ON_C - {"alice@acme"}, id="toOthers: not the sending tab"
        ),
        pytest.param("c", {"socket": "s-unknown"}, ON_C, id="toOthers: unknown socket"),
        pytest.param(
            "c",
            {"socket": "s1", "users": frozenset({"alice"})},
            {"alice@globex"},
            id="toOthers and users",
        ),
        pytest.param(
            "c",
            {"socket": "s2", "tenant": "acme"},
            {"alice@acme", "nobody@acme"},
            id="toOthers and tenant",
        ),
        pytest.param(
            "c",
            {"socket": "s5", "users": frozenset({"dave"})},
            set(),
            id="toOthers excludes the only user",
        ),
        pytest.param(
            "other", {}, {"carol@acme/other", "dave/both"}, id="another channel's subscribers"
        ),
        pytest.param(
            "other", {"tenant": "acme"}, {"carol@acme/other"}, id="another channel, tenant"
        ),
        pytest.param(
            "other", {"users": frozenset({"dave", "alice"})}, {"dave/both"}, id="not subscribed"
        ),
        pytest.param("unsubscribed", {}, set(), id="channel nobody subscribes to"),
    ],
)
async def test_each_event_reaches_exactly_its_audience(
    channel: str, fields: dict[str, Any], receivers: set[str]
) -> None:
    scene = Scene()
    for name, (channels, user, tenant, socket_id) in AUDIENCE.items():
        scene.open(name, channels, user=user, tenant=tenant, socket_id=socket_id)
    pub = scene.publish(channel, "payload", **fields)
    await tick()
    got = {name for name in AUDIENCE if scene.writes(name)}
    assert got == receivers
    expected = sse_frame(scene.event_id(1), "payload")
    for name in receivers:
        assert scene.writes(name) == [expected], name
        assert scene.conns[name].last_id == pub.id
    for name in AUDIENCE.keys() - receivers:
        assert scene.conns[name].last_id is None, "an unseen event is not its position"
    assert scene.stats.events_delivered == len(receivers)
    assert scene.stats.events_ingested == 1
    assert scene.recorded == [pub], "history records every event, seen or not"


# -- ordering and pausing ----------------------------------------------------------------

# A script of operations on a scene of three connections:
#   A: channels c1, c2 (started)    B: channel c2 (started)    P: c1, c2 (paused)
# ("pub", channel, label)   publish an event whose data is ``label``
# ("send", conn, label)     hub.send a control frame to one connection
# ("start", conn)           hub.start
# ("tick",)                 one loop iteration (the flush)
# Expected: per connection, its transport's writes, each a list of labels.

ORDERING = [
    pytest.param(
        [("pub", "c1", "a"), ("pub", "c2", "b"), ("pub", "c1", "c"), ("tick",)],
        {"A": [["a", "b", "c"]], "B": [["b"]], "P": []},
        id="events of several channels in publish order, one write",
    ),
    pytest.param(
        [
            ("pub", "c1", "a"),
            ("send", "A", "x"),
            ("pub", "c2", "b"),
            ("send", "A", "y"),
            ("send", "B", "z"),
            ("tick",),
        ],
        {"A": [["a", "x", "b", "y"]], "B": [["b", "z"]], "P": []},
        id="control frames stay in line with events",
    ),
    pytest.param(
        [("send", "A", "x"), ("tick",), ("pub", "c1", "a"), ("send", "A", "y"), ("tick",)],
        {"A": [["x"], ["a", "y"]], "B": [], "P": []},
        id="one write per connection per flush",
    ),
    pytest.param(
        [
            ("pub", "c1", "a"),
            ("send", "P", "x"),
            ("tick",),
            ("pub", "c2", "b"),
            ("tick",),
            ("start", "P"),
            ("pub", "c1", "c"),
            ("tick",),
        ],
        {"A": [["a"], ["b"], ["c"]], "B": [["b"]], "P": [["a", "x", "b", "c"]]},
        id="paused collects across flushes until start",
    ),
    pytest.param(
        [("start", "P"), ("tick",), ("pub", "c2", "a"), ("tick",)],
        {"A": [["a"]], "B": [["a"]], "P": [["a"]]},
        id="start with nothing queued writes nothing",
    ),
    pytest.param(
        [("pub", "c1", "a"), ("start", "P"), ("send", "P", "x"), ("tick",)],
        {"A": [["a"]], "B": [], "P": [["a", "x"]]},
        id="start then send in the same iteration",
    ),
    pytest.param(
        [("send", "P", "x"), ("send", "P", "y"), ("tick",), ("start", "P"), ("tick",)],
        {"A": [], "B": [], "P": [["x", "y"]]},
        id="paused connection: control frames wait too",
    ),
]


@pytest.mark.parametrize(("script", "expected"), ORDERING)
async def test_frames_reach_each_connection_in_order_one_write_per_flush(
    script: list[tuple[str, ...]], expected: dict[str, list[list[str]]]
) -> None:
    scene = Scene()
    scene.open("A", ("c1", "c2"))
    scene.open("B", ("c2",))
    scene.open("P", ("c1", "c2"), started=False)
    frames: dict[str, bytes] = {}
    for op, *args in script:
        if op == "pub":
            channel, label = args
            scene.publish(channel, label)
            frames[label] = sse_frame(scene.event_id(scene.published), label)
        elif op == "send":
            name, label = args
            scene.hub.send(scene.conns[name], control(label))
            frames[label] = control(label)
        elif op == "start":
            scene.hub.start(scene.conns[args[0]])
        else:
            await tick()
    for name, writes in expected.items():
        assert scene.writes(name) == [b"".join(frames[x] for x in w) for w in writes], name


async def test_stream_positions_become_the_ids_and_the_head() -> None:
    scene = Scene()
    scene.open("A")
    seq = (1_700_000_000_123 << 64) | 7
    pub = scene.hub.publish(Event("c", "s"), position=(seq, "1700000000123-7"))
    await tick()
    assert (pub.id, pub.seq, scene.hub.head, scene.hub.seq) == ("1700000000123-7", seq) * 2
    assert scene.writes("A") == [sse_frame("1700000000123-7", "s")]


# -- coalescing --------------------------------------------------------------------------


async def test_a_burst_is_one_flush_and_one_write_per_connection() -> None:
    scene = Scene()
    plain = [scene.open(f"p{i}") for i in range(3)]
    chunked = [scene.open(f"k{i}", chunked=True) for i in range(3)]
    flushes = 0
    flush = scene.hub.flush

    def counting_flush() -> None:
        nonlocal flushes
        flushes += 1
        flush()

    scene.hub.flush = counting_flush  # type: ignore[method-assign]
    pubs = [scene.publish("c", f"e{i}") for i in range(100)]
    # Nothing is written while the burst is being published...
    assert all(not scene.writes(name) for name in scene.conns)
    # ...and every connection holds the very bytes objects the events were encoded to.
    for conn in plain:
        assert all(q is p.frame for q, p in zip(conn.pending, pubs, strict=True))
    for conn in chunked:
        assert all(q is p.chunk for q, p in zip(conn.pending, pubs, strict=True))
    await tick()
    assert flushes == 1
    stream = b"".join(sse_frame(scene.event_id(i), f"e{i - 1}") for i in range(1, 101))
    for conn in plain:
        assert scene.writes(conn.remote) == [stream]
        assert conn.events_sent == 100 and conn.bytes_sent == len(stream)
    for conn in chunked:
        (written,) = scene.writes(conn.remote)
        assert b"".join(dechunk(written)) == stream
        assert len(dechunk(written)) == 100, "one chunk per event"
    assert scene.stats.events_delivered == 600
    assert scene.stats.bytes_sent == sum(len(scene.transport(n).data) for n in scene.conns)
    await tick()
    assert flushes == 1, "no flush without new frames"


async def test_a_single_event_is_written_as_the_same_bytes_object_to_everyone() -> None:
    scene = Scene()
    for i in range(3):
        scene.open(f"p{i}")
        scene.open(f"k{i}", chunked=True)
    pub = scene.publish("c", "shared")
    await tick()
    for name in scene.conns:
        (written,) = scene.writes(name)
        assert written is (pub.chunk if scene.conns[name].chunked else pub.frame), name
    assert pub.frame == sse_frame(pub.id, "shared")
    assert pub.chunk == as_chunk(pub.frame)


# -- slow consumers ----------------------------------------------------------------------

FRAME = len(sse_frame("p1700000000000-1", "x" * 20))  # an event's size (ids of equal length)


@pytest.mark.parametrize(
    ("limit", "bursts", "aborted_after"),
    [
        pytest.param(3 * FRAME, [3], None, id="unsent bytes exactly at the limit: kept"),
        pytest.param(3 * FRAME - 1, [3], 0, id="one byte over: aborted"),
        pytest.param(3 * FRAME, [2, 1], None, id="across flushes, at the limit: kept"),
        pytest.param(3 * FRAME, [2, 1, 1], 2, id="across flushes, over: aborted then"),
        pytest.param(FRAME - 1, [1], 0, id="a single frame over the limit"),
        pytest.param(0, [1], 0, id="limit 0: any unsent byte"),
    ],
)
async def test_slow_consumer_is_aborted_when_unsent_bytes_pass_the_limit(
    limit: int, bursts: list[int], aborted_after: int | None
) -> None:
    scene = Scene(write_buffer_bytes=limit)
    slow = scene.open("slow", reading=False)
    fast = scene.open("fast")
    fast_chunked = scene.open("fast-chunked", chunked=True)
    sent = 0
    for index, burst in enumerate(bursts):
        for _ in range(burst):
            scene.publish("c", "x" * 20)
            sent += 1
        await tick()
        gone = aborted_after is not None and index >= aborted_after
        assert slow.closed is gone, index
        assert scene.transport("slow").aborted is gone
    if aborted_after is None:
        assert scene.stats.slow_consumers == 0
        assert scene.transport("slow").unsent == sent * FRAME
    else:
        assert scene.stats.slow_consumers == 1
        assert slow.close_reason == "slow_consumer" and slow.done.result() == "slow_consumer"
        assert len(scene.writes("slow")) == aborted_after + 1, "nothing written after the abort"
        # Still registered until its handler unregisters it: later events are not written.
        scene.publish("c", "late")
        sent += 1
        await tick()
        assert len(scene.writes("slow")) == aborted_after + 1
        assert scene.transport("slow").writes_after_close == 0
        scene.hub.remove(slow)
        assert scene.stats.connections_closed == {"slow_consumer": 1}
    # The others receive everything, unaffected.
    assert scene.transport("fast").data.count(b"data: ") == sent
    assert len(dechunk(scene.transport("fast-chunked").data)) == sent
    assert not fast.closed and not fast_chunked.closed


async def test_a_connection_whose_peer_left_is_finished_without_a_write() -> None:
    scene = Scene()
    gone = scene.open("gone")
    stays = scene.open("stays")
    scene.transport("gone").closing = True
    scene.publish("c", "e")
    await tick()
    assert scene.writes("gone") == [] and gone.close_reason == "client_closed"
    assert scene.writes("stays") == [sse_frame(scene.event_id(1), "e")] and not stays.closed
    assert scene.stats.slow_consumers == 0


async def test_a_finished_connection_is_queued_nothing_more() -> None:
    scene = Scene()
    done = scene.open("done")
    scene.open("live")
    done.finish("token_expired")  # its handler has not unregistered it yet
    for _ in range(3):
        scene.publish("c", "e")
    await tick()
    assert scene.writes("done") == []
    assert scene.stats.events_delivered == 3, "only the live connection's frames count"
    assert done.pending == []


# -- visit(): heartbeats, positions, write deadline --------------------------------------


class FakeTime:
    """Stands in for the ``time`` module inside broker.hub only (the loop keeps its clock)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def time_ns(self) -> int:
        return int(self.time() * 1e9)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTime]:
    fake = FakeTime()
    monkeypatch.setattr(hub_module, "time", fake)
    yield fake


HEARTBEAT = b":\n\n"


def id_block(id: str) -> bytes:
    return f"id: {id}\n\n".encode()


async def test_visit_heartbeats_idle_connections_and_hands_them_the_head(
    clock: FakeTime,
) -> None:
    scene = Scene()
    hub = scene.hub
    conns = [
        scene.open("on-c"),
        scene.open("on-other", ("other",)),
        scene.open("chunked", chunked=True),
        scene.open("paused", started=False),
    ]

    def visit() -> dict[str, list[bytes]]:
        """What one visit writes, per connection."""
        before = {c.remote: len(scene.writes(c.remote)) for c in conns}
        hub.visit(conns)
        return {name: scene.writes(name)[n:] for name, n in before.items()}

    head0 = hub.head
    # Never sent anything: the first visit hands over the head as the position.
    assert visit() == {
        "on-c": [id_block(head0)],
        "on-other": [id_block(head0)],
        "chunked": [as_chunk(id_block(head0))],
        "paused": [],
    }
    assert visit() == {
        "on-c": [HEARTBEAT],
        "on-other": [HEARTBEAT],
        "chunked": [as_chunk(HEARTBEAT)],
        "paused": [],
    }
    # An event on "c", not yet flushed: its receivers are busy, the rest get the new head.
    pub = scene.publish("c", "e")
    assert visit() == {"on-c": [], "on-other": [id_block(pub.id)], "chunked": [], "paused": []}
    await tick()  # the event is written: that counts as traffic for one visit
    assert [len(v) for v in visit().values()] == [0, 1, 0, 0]
    assert visit() == {
        "on-c": [HEARTBEAT],
        "on-other": [HEARTBEAT],
        "chunked": [as_chunk(HEARTBEAT)],
        "paused": [],
    }
    # An event nobody subscribed to still moves the head.
    other = scene.publish("elsewhere", "e2")
    assert visit()["on-c"] == [id_block(other.id)]
    hub.skip()  # an outage's burned position is a new head as well
    assert visit()["on-other"] == [id_block(hub.head)]
    assert hub.head == scene.event_id(3)
    assert scene.transport("paused").writes == []
    # heartbeats count as bytes sent, not as events
    total = sum(len(scene.transport(c.remote).data) for c in conns)
    assert scene.stats.bytes_sent == total
    assert all(c.events_sent == (1 if c.remote in ("on-c", "chunked") else 0) for c in conns)


async def test_visit_skips_closed_connections(clock: FakeTime) -> None:
    scene = Scene()
    conn = scene.open("closed")
    conn.finish("drain")
    scene.hub.visit([conn])
    assert scene.writes("closed") == []


@pytest.mark.parametrize(
    ("visits", "ended_at"),
    [
        pytest.param([(0, 5), (TIMEOUT, 5)], None, id="stuck exactly write_timeout: kept"),
        pytest.param([(0, 5), (TIMEOUT + 0.5, 5)], 1, id="stuck longer: ended"),
        pytest.param([(0, 5), (10, 5), (20, 5), (31, 5)], 3, id="measured from the first sight"),
        pytest.param(
            [(0, 5), (20, 0), (40, 5), (65, 5), (70.5, 5)],
            4,
            id="a drained buffer restarts the clock",
        ),
        pytest.param([(0, 0), (40, 0), (80, 0)], None, id="never stuck"),
        pytest.param([(0, 0), (40, 7), (71, 7)], 2, id="stuck later"),
    ],
)
async def test_visit_ends_a_connection_whose_bytes_do_not_drain(
    clock: FakeTime, visits: list[tuple[float, int]], ended_at: int | None
) -> None:
    scene = Scene()
    stuck = scene.open("stuck")
    paused = scene.open("paused", started=False)
    healthy = scene.open("healthy")
    start = clock.now
    for index, (at, unsent) in enumerate(visits):
        clock.now = start + at
        scene.transport("stuck").unsent = unsent
        scene.transport("paused").unsent = unsent  # the deadline holds during a backlog too
        scene.hub.visit([stuck, paused, healthy])
        ended = ended_at is not None and index >= ended_at
        for conn in (stuck, paused):
            assert conn.closed is ended, (conn.remote, index)
        assert not healthy.closed
    if ended_at is not None:
        for name in ("stuck", "paused"):
            assert scene.conns[name].close_reason == "write_timeout"
            assert scene.transport(name).aborted
    assert scene.stats.slow_consumers == 0
    assert len(scene.writes("healthy")) == len(visits), "one heartbeat per visit"


# -- end() -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunked", "pending", "closing", "written"),
    [
        pytest.param(False, ["a", "b"], True, [["a", "b", "BYE"]], id="pending then closing"),
        pytest.param(False, [], True, [["BYE"]], id="closing frame alone"),
        pytest.param(False, ["a"], False, [["a"]], id="no closing frame"),
        pytest.param(False, [], False, [], id="nothing to write"),
        pytest.param(True, ["a", "b"], True, [["a", "b", "BYE"]], id="chunked"),
    ],
)
async def test_end_writes_pending_frames_then_the_closing_frame_once(
    chunked: bool, pending: list[str], closing: bool, written: list[list[str]]
) -> None:
    scene = Scene()
    conn = scene.open("x", chunked=chunked)
    frames = {"BYE": control("BYE")}
    for label in pending:
        pub = scene.publish("c", label)
        frames[label] = sse_frame(pub.id, label)
    scene.hub.end(conn, "drain", control("BYE") if closing else None)
    await tick()  # the flush scheduled by the publishes finds nothing left
    wrap = as_chunk if chunked else bytes
    assert scene.writes("x") == [b"".join(wrap(frames[x]) for x in w) for w in written]
    assert conn.close_reason == "drain" and conn.done.result() == "drain"
    assert not scene.transport("x").aborted and not scene.transport("x").closing
    assert conn.pending == []
    scene.hub.send(conn, control("after"))
    scene.hub.end(conn, "again", control("again"))
    await tick()
    assert scene.writes("x") == [b"".join(wrap(frames[x]) for x in w) for w in written]
    assert conn.close_reason == "drain", "the first reason stays"


async def test_end_when_the_peer_already_left_records_client_closed() -> None:
    scene = Scene()
    conn = scene.open("x")
    scene.publish("c", "a")
    scene.transport("x").closing = True
    scene.hub.end(conn, "drain", control("BYE"))
    assert scene.writes("x") == []
    assert conn.close_reason == "client_closed"


async def test_end_of_a_paused_connection_writes_nothing() -> None:
    # Its preamble and backlog go out through aiohttp while it is paused, so
    # the hub cannot write its frames (they would land inside the backlog):
    # pending frames and the closing frame are dropped, the stream just ends.
    scene = Scene()
    conn = scene.open("paused", started=False)
    scene.publish("c", "a")
    scene.hub.end(conn, "drain", control("BYE"))
    await tick()
    assert scene.writes("paused") == []
    assert conn.close_reason == "drain" and conn.pending == []
    scene.hub.start(conn)  # the handler's backlog finishes, then it starts the stream
    await tick()
    assert scene.writes("paused") == []


# -- chunked and non-chunked framing -----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "event"),
    [
        ("plain", None),
        ("two\nlines", None),
        ("crlf\r\nand cr\rsplit", None),
        ('{"json":true}', "order.created"),
        ("é ünïcode ✓", None),  # chunk sizes count bytes, not characters
        ("x" * 5000, "big"),  # sizes above 0xfff: several hex digits
    ],
)
async def test_chunked_connections_get_each_frame_as_one_http_chunk(
    data: str, event: str | None
) -> None:
    scene = Scene()
    scene.open("plain")
    scene.open("chunked", chunked=True)
    pub = scene.publish("c", data, **({"event": event} if event else {}))
    scene.hub.send(scene.conns["plain"], control("ctl"))
    scene.hub.send(scene.conns["chunked"], control("ctl"))
    await tick()
    lines = data.replace("\r\n", "\n").replace("\r", "\n")
    frame = sse_frame(pub.id, lines, event)
    assert scene.writes("plain") == [frame + control("ctl")]
    (written,) = scene.writes("chunked")
    assert dechunk(written) == [frame, control("ctl")]
    size = len(frame)
    assert written.startswith(f"{size:x}\r\n".encode())
    assert written == as_chunk(frame) + as_chunk(control("ctl"))


# -- membership --------------------------------------------------------------------------


async def test_removed_connections_receive_nothing_and_are_counted_by_reason() -> None:
    scene = Scene()
    a = scene.open("a", ("c", "d"))
    b = scene.open("b", ("c",))
    scene.open("c", ("d",))
    assert scene.hub.subscriptions() == 4
    a.finish("token_expired")
    scene.hub.remove(a)
    scene.hub.remove(a)  # twice is harmless
    scene.hub.remove(b)  # removed without a reason: the client left
    assert scene.hub.subscriptions() == 1
    assert scene.stats.connections_opened == 3
    assert scene.stats.connections_closed == {"token_expired": 1, "client_closed": 1}
    scene.publish("c", "e1")
    scene.publish("d", "e2", retain="k")
    await tick()
    assert scene.writes("a") == scene.writes("b") == []
    assert scene.writes("c") == [sse_frame(scene.event_id(2), "e2")]
    assert [p.event.data for p in scene.recorded] == ["e1", "e2"]
    assert [p.event.data for p in scene.retained] == ["e2"]


# -- channels released to the ingest ---------------------------------------------------------


async def test_a_channel_is_released_when_its_last_stream_leaves_or_finishes() -> None:
    scene = Scene()
    released: list[str] = []
    scene.hub.release = released.append
    a = scene.open("a", ("c", "d"))
    b = scene.open("b", ("c",))
    scene.hub.remove(a)
    assert released == ["d"], "c still has b"
    b.finish("token_expired")  # its handler has not unregistered it yet
    assert released == ["d", "c"]
    scene.hub.remove(b)
    assert released == ["d", "c"], "released once"
    scene.open("c2", ("c",))
    assert released == ["d", "c"]
