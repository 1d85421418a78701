"""The SSE codec, byte for byte."""

from __future__ import annotations

import pytest

from broker import sse
from broker.connection import chunk
from broker.control import reconnect_frame, reset_frame


@pytest.mark.parametrize(
    ("data", "event", "id", "expected"),
    [
        ("hello", None, None, b"data: hello\n\n"),
        ("hello", "message", None, b"data: hello\n\n"),
        ("hello", "tick", "1-2", b"id: 1-2\nevent: tick\ndata: hello\n\n"),
        ('{"a":1}', "upd", None, b'event: upd\ndata: {"a":1}\n\n'),
        ("a\nb", None, None, b"data: a\ndata: b\n\n"),
        ("a\r\nb\rc", None, None, b"data: a\ndata: b\ndata: c\n\n"),
        ("a\n", None, None, b"data: a\ndata: \n\n"),
        ("", None, None, b"data: \n\n"),
        ("  leading", None, None, b"data:   leading\n\n"),
        ("data: nested\n\nid: 9", None, None, b"data: data: nested\ndata: \ndata: id: 9\n\n"),
        ("h\u00e9llo \u2603", None, "7", "id: 7\ndata: h\u00e9llo \u2603\n\n".encode()),
    ],
)
def test_encode_event(data: str, event: str | None, id: str | None, expected: bytes) -> None:
    assert sse.encode_event(data, event=event, id=id) == expected


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "a\0b", "x\n\ndata: injected"])
def test_event_name_cannot_inject_lines(bad: str) -> None:
    with pytest.raises(ValueError, match="must not contain"):
        sse.encode_event("x", event=bad)


@pytest.mark.parametrize("bad", ["1\n2", "1\r", "\0"])
def test_id_cannot_inject_lines(bad: str) -> None:
    with pytest.raises(ValueError):
        sse.encode_event("x", id=bad)
    with pytest.raises(ValueError):
        sse.encode_id(bad)


def test_id_only_block_moves_cursor_without_data() -> None:
    assert sse.encode_id("5-10") == b"id: 5-10\n\n"


def test_retry() -> None:
    assert sse.encode_retry(3000) == b"retry: 3000\n"
    with pytest.raises(ValueError):
        sse.encode_retry(-1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", b":\n"), ("ok", b": ok\n"), ("a\nb", b": a\n: b\n"), ("a\r\n", b": a\n:\n")],
)
def test_comment(text: str, expected: bytes) -> None:
    assert sse.encode_comment(text) == expected


def test_heartbeat_is_a_comment_block() -> None:
    assert sse.HEARTBEAT == b":\n\n"


def test_chunk_framing() -> None:
    assert chunk(b"data: x\n\n") == b"9\r\ndata: x\n\n\r\n"
    assert chunk(b"a" * 26) == b"1a\r\n" + b"a" * 26 + b"\r\n"


def test_control_frames() -> None:
    assert reset_frame("outage", "5-9", 1200) == (
        b'id: 5-9\nevent: broker.reset\ndata: {"reason":"outage","refetch_after_ms":1200}\n\n'
    )
    assert reconnect_frame("drain", 2500, "5-9") == (
        b"retry: 2500\nid: 5-9\nevent: broker.reconnect\n"
        b'data: {"reason":"drain","retry_ms":2500}\n\n'
    )
    assert reconnect_frame("limit", 100, None) == (
        b'retry: 100\nevent: broker.reconnect\ndata: {"reason":"limit","retry_ms":100}\n\n'
    )


@pytest.mark.parametrize(
    ("data", "event", "id"),
    [("x", "message", "1-1"), ("a\nb\r\nc", "upd", "5-9"), ("", "e", "0-0"), (" sp", "m", "1")],
)
def test_trusted_encoder_matches_the_checked_one(data: str, event: str, id: str) -> None:
    assert sse.encode_trusted(data, event, id) == sse.encode_event(data, event=event, id=id)
