"""The SSE client is the oracle of every stream test: these tests hold it to the spec.

Parser cases are tables of bytes -> events, each fed whole, one byte at a time
and split at every offset, so chunk boundaries can never change the outcome.
Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from sse_client import SSEClient, SSEEvent, SSEParser, SSEStatusError, SSEStreamClosed


def E(data: str, type: str = "message", id: str = "") -> SSEEvent:
    return SSEEvent(data=data, type=type, last_event_id=id)


@dataclass(frozen=True)
class Outcome:
    events: list[SSEEvent]
    last_event_id: str
    retry: int | None
    comments: list[str]
    id_only_updates: int


def run(chunks: list[bytes]) -> Outcome:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return Outcome(
        events, parser.last_event_id, parser.retry, list(parser.comments), parser.id_only_updates
    )


def splits(stream: bytes) -> list[list[bytes]]:
    """The stream whole, byte by byte, and cut in two at every offset."""
    ways = [[stream], [stream[i : i + 1] for i in range(len(stream))]]
    ways += [[stream[:i], stream[i:]] for i in range(1, len(stream))]
    return ways


# (id, stream, expected events); the other state is checked in dedicated tables.
EVENT_CASES: list[tuple[str, bytes, list[SSEEvent]]] = [
    # -- the spec's own examples --
    ("spec-stock-ticker", b"data: YHOO\ndata: +2\ndata: 10\n\n", [E("YHOO\n+2\n10")]),
    (
        "spec-ids",
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
        b"data:  third event\n\n",
        [E("first event", id="1"), E("second event", id=""), E(" third event", id="")],
    ),
    ("spec-empty-data", b"data\n\ndata\ndata\n\ndata:", [E(""), E("\n")]),
    ("spec-optional-space", b"data:test\n\ndata: test\n\n", [E("test"), E("test")]),
    (
        "spec-event-types",
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
        [E("73857293", "add"), E("2153", "remove"), E("113411", "add")],
    ),
    # -- line endings --
    ("crlf", b"event: a\r\ndata: 1\r\ndata: 2\r\n\r\n", [E("1\n2", "a")]),
    ("cr-only", b"event: a\rdata: 1\rdata: 2\r\r", [E("1\n2", "a")]),
    ("mixed-endings", b"data: a\r\ndata: b\rdata: c\n\r\n", [E("a\nb\nc")]),
    ("lf-then-cr-is-two-endings", b"data: x\n\rdata: y\n\n", [E("x"), E("y")]),
    ("cr-cr-is-blank-line", b"data: x\r\rdata: y\r\n\r\n", [E("x"), E("y")]),
    ("crlf-crlf", b"data: x\r\n\r\ndata: y\r\n\r\n", [E("x"), E("y")]),
    # -- decoding --
    ("bom-stripped", b"\xef\xbb\xbfdata: x\n\n", [E("x")]),
    ("second-bom-kept", b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n", [E("y")]),
    ("bom-only-at-start", b"data: x\n\n\xef\xbb\xbfdata: y\n\n", [E("x")]),
    (
        "multibyte",
        "data: h\u00e9llo \u20ac\U0001d11e\n\n".encode(),
        [E("h\u00e9llo \u20ac\U0001d11e")],
    ),
    ("invalid-utf8-replaced", b"data: a\xffb\xc3(\n\n", [E("a\ufffdb\ufffd(")]),
    ("nul-in-data-kept", b"data: a\x00b\n\n", [E("a\x00b")]),
    # -- fields --
    ("one-space-removed-only", b"data:  two\n\n", [E(" two")]),
    ("tab-not-removed", b"data:\tx\n\n", [E("\tx")]),
    ("colon-in-value", b"data: a: b:c\n\n", [E("a: b:c")]),
    ("empty-data-line-inside", b"data: a\ndata:\ndata: b\n\n", [E("a\n\nb")]),
    ("trailing-space-kept", b"data: a \nevent: t \n\n", [E("a ", "t ")]),
    ("unknown-fields-ignored", b"foo: bar\ndata: 1\nDATA: 2\nData: 3\n data: 4\n\n", [E("1")]),
    ("field-without-colon-data", b"data\ndata\n\n", [E("\n")]),
    ("field-without-colon-event", b"event: x\nevent\ndata: a\n\n", [E("a")]),
    ("field-without-colon-id", b"id: 3\ndata: a\n\nid\ndata: b\n\n", [E("a", id="3"), E("b")]),
    ("empty-event-means-message", b"event:\ndata: a\n\n", [E("a")]),
    ("event-type-reset-after-dispatch", b"event: x\ndata: 1\n\ndata: 2\n\n", [E("1", "x"), E("2")]),
    ("event-without-data-not-dispatched", b"event: x\n\ndata: 2\n\n", [E("2")]),
    ("id-persists", b"id: 7\ndata: a\n\ndata: b\n\n", [E("a", id="7"), E("b", id="7")]),
    ("id-after-data-same-block", b"data: a\nid: 9\n\n", [E("a", id="9")]),
    ("id-with-nul-ignored", b"id: 1\n\ndata: a\nid: 2\x003\n\n", [E("a", id="1")]),
    ("id-only-block-then-event", b"id: 5\n\ndata: a\n\n", [E("a", id="5")]),
    ("comments-ignored", b":x\ndata: a\n: y\ndata: b\n:\n\n", [E("a\nb")]),
    ("blank-lines-alone", b"\n\n\r\n\r", []),
    ("incomplete-block-not-dispatched", b"data: a\n\ndata: b\n", [E("a")]),
    ("incomplete-line-not-dispatched", b"data: a\n\ndata: b", [E("a")]),
    ("retry-does-not-dispatch", b"retry: 10\n\n", []),
]


@pytest.mark.parametrize(
    ("stream", "expected"), [c[1:] for c in EVENT_CASES], ids=[c[0] for c in EVENT_CASES]
)
def test_parser_events_for_every_chunking(stream: bytes, expected: list[SSEEvent]) -> None:
    for chunks in splits(stream):
        assert run(chunks).events == expected, chunks


# (id, stream, expected retry)
RETRY_CASES: list[tuple[str, bytes, int | None]] = [
    ("digits", b"retry: 1500\n", 1500),
    ("no-space", b"retry:20\n", 20),
    ("leading-zeros", b"retry: 0123\n", 123),
    ("zero", b"retry: 0\n", 0),
    ("last-valid-wins", b"retry: 10\nretry: 20\n", 20),
    ("letters-ignored", b"retry: 15a\n", None),
    ("negative-ignored", b"retry: -1\n", None),
    ("decimal-ignored", b"retry: 1.5\n", None),
    ("empty-ignored", b"retry:\nretry\n", None),
    ("two-spaces-ignored", b"retry:  100\n", None),
    ("trailing-space-ignored", b"retry: 100 \n", None),
    ("non-ascii-digits-ignored", "retry: \u0661\u0662\n".encode(), None),
    ("superscript-ignored", "retry: 1\u00b2\n".encode(), None),
    ("invalid-keeps-previous", b"retry: 10\nretry: x\n", 10),
    ("unterminated-line-not-applied", b"retry: 10", None),
]


@pytest.mark.parametrize(
    ("stream", "expected"), [c[1:] for c in RETRY_CASES], ids=[c[0] for c in RETRY_CASES]
)
def test_parser_retry(stream: bytes, expected: int | None) -> None:
    for chunks in splits(stream):
        assert run(chunks).retry == expected, chunks


# (id, stream, expected last_event_id, expected id_only_updates)
ID_CASES: list[tuple[str, bytes, str, int]] = [
    ("id-only-block", b"id: 5\n\n", "5", 1),
    ("same-id-again-not-counted", b"id: 5\n\nid: 5\n\n", "5", 1),
    ("heartbeats-between", b"id: 5\n\n:hb\n\nid: 6\n\n", "6", 2),
    ("id-with-event-but-no-data", b"id: 5\nevent: x\n\n", "5", 1),
    ("dispatched-event-not-counted", b"id: 5\ndata: a\n\n", "5", 0),
    ("event-then-heartbeat", b"id: 1\ndata: a\n\nid: 2\n\n", "2", 1),
    ("reset-to-empty-counted", b"id: 1\n\nid\n\n", "", 2),
    ("nul-id-ignored", b"id: 1\n\nid: \x00\n\n", "1", 1),
    ("not-committed-before-blank-line", b"id: 1\n", "", 0),
    ("comment-block-not-counted", b":hb\n\n", "", 0),
    ("last-id-line-of-block-wins", b"id: 1\nid: 2\n\n", "2", 1),
    ("crlf-heartbeat", b"id: 3\r\n\r\n", "3", 1),
]


@pytest.mark.parametrize(
    ("stream", "last_id", "updates"), [c[1:] for c in ID_CASES], ids=[c[0] for c in ID_CASES]
)
def test_parser_last_event_id_and_id_only_updates(
    stream: bytes, last_id: str, updates: int
) -> None:
    for chunks in splits(stream):
        outcome = run(chunks)
        assert (outcome.last_event_id, outcome.id_only_updates) == (last_id, updates), chunks


def test_parser_collects_comments_without_colon_and_one_space() -> None:
    for chunks in splits(b":hello\n: world\n:  two spaces\n:\r\n: \rdata: x\n\n:tail"):
        outcome = run(chunks)
        assert outcome.comments == ["hello", "world", " two spaces", "", ""], chunks
        assert outcome.events == [E("x")]


def test_parser_id_buffer_commits_only_at_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 9\n") == []
    assert (parser.last_event_id_buffer, parser.last_event_id) == ("9", "")
    assert parser.feed(b"\n") == []
    assert (parser.last_event_id, parser.id_only_updates) == ("9", 1)


def test_parser_crlf_split_across_feeds_is_one_line_ending() -> None:
    parser = SSEParser()
    # Read as two endings, "\r" + "\n" would be a blank line and dispatch "a" alone.
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [E("a\nb")]
    assert parser.feed(b"\n") == []  # the LF pairs with the CR that ended the blank line
    assert parser.dispatched == 1


def test_parser_dispatches_at_a_final_cr_without_waiting_for_more() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\r") == [E("a")]
    assert parser.feed(b"\rdata: b\r\r") == [E("b")]  # a CR after CR is a new (blank) line


def test_parser_multibyte_split_across_feeds() -> None:
    parser = SSEParser()
    clef = "\U0001d11e".encode()
    assert parser.feed(b"data: " + clef[:1]) == []
    assert parser.feed(clef[1:3]) == []
    assert parser.feed(clef[3:] + b"\n\n") == [E("\U0001d11e")]


def test_parser_bom_split_across_feeds() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb") == []
    assert parser.feed(b"\xbfdata: x\n\n") == [E("x")]


def test_parser_close_discards_pending_block() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\nid: 4\n") == []
    parser.close()
    assert (parser.last_event_id, parser.dispatched) == ("", 0)
    with pytest.raises(RuntimeError):
        parser.feed(b"\n")


def test_event_is_frozen_and_parses_json() -> None:
    event = E('{"reason": "epoch", "refetch_after_ms": 10}', "broker.reset", "1-2")
    assert event.json() == {"reason": "epoch", "refetch_after_ms": 10}
    with pytest.raises(AttributeError):
        event.data = "x"  # type: ignore[misc]


# -- properties ----------------------------------------------------------------

_TOKENS = [b"data", b"id", b"event", b"retry", b":", b" ", b"\r", b"\n", b"\r\n", b"1", b"x"]
_TOKENS += [b"\xc3", b"\xa9", b"\xef\xbb\xbf", b"\x00", "\u20ac".encode()]


@settings(database=None, deadline=None, max_examples=300)
@given(
    parts=st.lists(st.sampled_from(_TOKENS), max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_parser_outcome_does_not_depend_on_chunking(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts)
    points = sorted({c for c in cuts if c <= len(stream)} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    assert run(chunks) == run([stream])


_LINE_TEXT = st.text(st.characters(exclude_characters="\r\n", codec="utf-8"), max_size=8)


@st.composite
def _events(draw: st.DrawFn) -> tuple[str | None, str, str | None]:
    kind = draw(st.one_of(st.none(), _LINE_TEXT))
    data = "\n".join(draw(st.lists(_LINE_TEXT, min_size=1, max_size=3)))
    event_id = draw(st.one_of(st.none(), _LINE_TEXT.filter(lambda s: "\x00" not in s)))
    return kind, data, event_id


@pytest.mark.slow
@settings(database=None, deadline=None, max_examples=300)
@given(
    events=st.lists(_events(), max_size=6),
    endings=st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=1),
    chunk=st.integers(min_value=1, max_value=16),
)
def test_parser_reads_back_what_an_encoder_writes(
    events: list[tuple[str | None, str, str | None]], endings: list[str], chunk: int
) -> None:
    lines: list[str] = []
    expected: list[SSEEvent] = []
    last_id = ""
    for kind, data, event_id in events:
        if kind is not None:
            lines.append(f"event: {kind}")
        lines += [f"data: {line}" for line in data.split("\n")]
        if event_id is not None:
            lines.append(f"id: {event_id}")
            last_id = event_id
        lines += [": comment", ""]
        expected.append(E(data, kind or "message", last_id))
    text = ""
    for i, line in enumerate(lines):
        end = endings[i % len(endings)]
        if not line and end == "\n" and text.endswith("\r"):
            end = "\r\n"  # a lone LF right after CR would pair with it: no blank line
        text += line + end
    stream = text.encode()
    outcome = run([stream[i : i + chunk] for i in range(0, len(stream), chunk)])
    assert outcome.events == expected
    assert outcome.last_event_id == last_id


# -- the async client, against an in-process HTTP server -----------------------

ABORT = b"<abort>"


@dataclass
class Script:
    """What the fake server sends: bytes as chunks, None ends cleanly, ABORT breaks."""

    chunks: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    requests: list[tuple[dict[str, str], list[tuple[str, str]]]] = field(default_factory=list)

    def send(self, *chunks: bytes | None) -> None:
        for chunk in chunks:
            self.chunks.put_nowait(chunk)


SCRIPT = web.AppKey("script", Script)


async def _stream_handler(request: web.Request) -> web.StreamResponse:
    script = request.app[SCRIPT]
    script.requests.append((dict(request.headers), list(request.query.items())))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    while True:
        chunk = await script.chunks.get()
        if chunk is None:
            await response.write_eof()
            return response
        if chunk == ABORT:
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(chunk)


async def _refused_handler(request: web.Request) -> web.Response:
    return web.json_response(
        {"error": "not_ready", "message": "no redis"}, status=503, headers={"Retry-After": "1"}
    )


@pytest.fixture
async def sse_server() -> AsyncIterator[tuple[Script, str]]:
    app = web.Application()
    script = Script()
    app[SCRIPT] = script
    app.router.add_get("/events", _stream_handler)
    app.router.add_get("/refused", _refused_handler)
    server = TestServer(app)
    await server.start_server()
    try:
        yield script, str(server.make_url(""))
    finally:
        script.send(None)
        await server.close()


async def test_client_sends_accept_params_and_last_event_id(sse_server: tuple[Script, str]) -> None:
    script, base = sse_server
    script.send(b"retry: 1000\n: ok\n\n")
    params = [("channel", "a"), ("channel", "b")]
    async with SSEClient.connect(
        base + "/events", params=params, headers={"X-Test": "1"}, last_event_id="7-1"
    ) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"] == "text/event-stream"
        assert await stream.wait_comment() == "ok"
        assert stream.parser.retry == 1000
    headers, query = script.requests[0]
    assert headers["Accept"] == "text/event-stream"
    assert headers["Last-Event-ID"] == "7-1"
    assert headers["X-Test"] == "1"
    assert query == params


async def test_client_headers_override_accept_case_insensitively(
    sse_server: tuple[Script, str],
) -> None:
    script, base = sse_server
    async with SSEClient.connect(base + "/events", headers={"accept": "application/json"}):
        pass
    assert script.requests[0][0]["Accept"] == "application/json"


async def test_client_queues_events_of_one_chunk_and_keeps_raw_bytes(
    sse_server: tuple[Script, str],
) -> None:
    script, base = sse_server
    wire = [b"id: 1\r\ndata: a\r", b"\n\r\nid: 2\ndata: b\n\nevent: t\ndata: c\n\n"]
    script.send(*wire)
    async with SSEClient.connect(base + "/events") as stream:
        assert await stream.next_event() == E("a", id="1")
        assert stream.pending == [E("b", id="2"), E("c", "t", "2")]
        assert await stream.events(2) == [E("b", id="2"), E("c", "t", "2")]
        assert stream.raw == b"".join(wire)


async def test_client_timeout_consumes_nothing(sse_server: tuple[Script, str]) -> None:
    script, base = sse_server
    async with SSEClient.connect(base + "/events") as stream:
        script.send(b"data: a\n")
        with pytest.raises(TimeoutError):
            await stream.next_event(timeout=0.05)
        script.send(b"\ndata: b\n\n")
        with pytest.raises(TimeoutError, match="3 events"):
            await stream.events(3, timeout=0.1)
        assert stream.pending == [E("a"), E("b")]
        script.send(b"data: c\n\n")
        assert await stream.events(3) == [E("a"), E("b"), E("c")]


async def test_client_counts_id_only_heartbeats(sse_server: tuple[Script, str]) -> None:
    script, base = sse_server
    script.send(b"data: a\nid: 1\n\n", b"id: 5\n\n")
    async with SSEClient.connect(base + "/events") as stream:
        await stream.wait_for(lambda s: s.parser.id_only_updates == 1)
        assert stream.parser.last_event_id == "5"
        assert await stream.next_event() == E("a", id="1")


async def test_client_wait_closed_keeps_remaining_events(sse_server: tuple[Script, str]) -> None:
    script, base = sse_server
    async with SSEClient.connect(base + "/events") as stream:
        assert await stream.wait_closed(timeout=0.05) is False
        script.send(b"event: broker.reconnect\ndata: {}\n\n", b"data: x\n\n", None)
        assert await stream.wait_closed() is True
        assert stream.close_error is None
        assert stream.pending == [E("{}", "broker.reconnect"), E("x")]
        assert (await stream.next_event()).type == "broker.reconnect"
        assert await stream.next_event() == E("x")
        with pytest.raises(SSEStreamClosed):
            await stream.next_event()


async def test_client_reports_a_broken_connection_as_closed(
    sse_server: tuple[Script, str],
) -> None:
    script, base = sse_server
    script.send(b"data: a\n\ndata: partial\n", ABORT)
    async with SSEClient.connect(base + "/events") as stream:
        assert await stream.wait_closed() is True
        assert isinstance(stream.close_error, aiohttp.ClientError)
        assert stream.pending == [E("a")]
        assert stream.parser.dispatched == 1


async def test_client_exposes_refusal_body(sse_server: tuple[Script, str]) -> None:
    _, base = sse_server
    async with SSEClient.connect(base + "/refused") as stream:
        assert stream.status == 503
        assert stream.headers["Retry-After"] == "1"
        assert await stream.json() == {"error": "not_ready", "message": "no redis"}
    async with SSEClient.connect(base + "/refused") as stream:
        with pytest.raises(SSEStatusError, match="503"):
            await stream.next_event()


async def test_client_uses_and_keeps_a_given_session(
    sse_server: tuple[Script, str], http: aiohttp.ClientSession
) -> None:
    script, base = sse_server
    script.send(b"data: a\n\n")
    async with SSEClient.connect(base + "/events", session=http) as stream:
        assert await stream.next_event() == E("a")
    assert not http.closed
