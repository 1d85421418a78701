"""Decoding inbound messages: the native envelope and the raw-text fallback."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.envelope import REJECT_REASONS, Event, decode_native
from broker.errors import Rejected

MAX = 1024


def decode(payload: Any, channel: str = "orders") -> Event:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return decode_native(channel, raw, MAX)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"data": {"id": 1}}, Event("orders", '{"id":1}')),
        ({"data": "verbatim text"}, Event("orders", "verbatim text")),
        ({"data": "a\nb"}, Event("orders", "a\nb")),
        ({"data": [1, 2]}, Event("orders", "[1,2]")),
        ({"data": []}, Event("orders", "[]")),
        ({"data": None}, Event("orders", "null")),
        ({"data": 7, "event": "upd"}, Event("orders", "7", event="upd")),
        ({"data": 1, "tenant": 42}, Event("orders", "1", tenant="42")),
        ({"data": 1, "tenant": "acme"}, Event("orders", "1", tenant="acme")),
        ({"data": 1, "users": [1, "2"]}, Event("orders", "1", users=frozenset({"1", "2"}))),
        ({"data": 1, "retain": "total"}, Event("orders", "1", retain="total")),
        (
            {"data": 1, "event": "count", "retain": True},
            Event("orders", "1", event="count", retain="count"),
        ),
        ({"data": 1, "retain": False}, Event("orders", "1")),
        ({"data": 1, "socket": "123.456", "other": "ignored"}, Event("orders", "1")),
        ({"data": 1, "event": None, "tenant": None}, Event("orders", "1")),
    ],
)
def test_native_envelope(payload: dict[str, Any], expected: Event) -> None:
    assert decode(payload) == expected


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"hello", "hello"),
        (b"", ""),
        (b'{"no_data_key": 1}', '{"no_data_key": 1}'),
        (b"[1,2,3]", "[1,2,3]"),
        (b"{not json", "{not json"),
        (b'"a string"', '"a string"'),
        ("caf\u00e9".encode(), "caf\u00e9"),
    ],
)
def test_raw_text_fallback(raw: bytes, text: str) -> None:
    assert decode(raw) == Event("orders", text)


def test_envelope_with_leading_whitespace_is_an_envelope() -> None:
    assert decode(b'\n {"data": 1, "event": "e"}') == Event("orders", "1", event="e")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"data": 1, "event": "broker.reset"}, "reserved_event"),
        ({"data": 1, "event": "broker."}, "reserved_event"),
        ({"data": 1, "event": "a\nb"}, "bad_event"),
        ({"data": 1, "event": "a\rdata: x"}, "bad_event"),
        ({"data": 1, "event": ""}, "bad_event"),
        ({"data": 1, "event": 5}, "bad_event"),
        ({"data": 1, "event": "x" * 201}, "bad_event"),
        ({"data": 1, "tenant": True}, "bad_tenant"),
        ({"data": 1, "tenant": 1.5}, "bad_tenant"),
        ({"data": 1, "tenant": ""}, "bad_tenant"),
        ({"data": 1, "tenant": ["a"]}, "bad_tenant"),
        ({"data": 1, "users": []}, "bad_users"),
        ({"data": 1, "users": "bob"}, "bad_users"),
        ({"data": 1, "users": [True]}, "bad_users"),
        ({"data": 1, "users": [None]}, "bad_users"),
        ({"data": 1, "users": [""]}, "bad_users"),
        ({"data": 1, "retain": 3}, "bad_retain"),
        ({"data": 1, "retain": ""}, "bad_retain"),
        ({"data": 1, "retain": "k", "users": [1]}, "retain_with_users"),
        (b"\xff\xfe not utf-8", "bad_encoding"),
    ],
)
def test_rejections(payload: Any, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        decode(payload)
    assert info.value.code == reason
    assert reason in REJECT_REASONS


def test_oversize_is_rejected_before_parsing() -> None:
    with pytest.raises(Rejected) as info:
        decode(b'{"data": "' + b"x" * MAX + b'"}')
    assert info.value.code == "too_large"
    assert "limits.max_event_bytes" in info.value.message
    # exactly at the limit is fine
    decode(b"x" * MAX)


@pytest.mark.parametrize(
    "channel",
    ["", "a" * 201, "has space", "tab\t", "star*", "q?", "caf\u00e9", "new\nline"],
)
def test_bad_channel_names(channel: str) -> None:
    with pytest.raises(Rejected) as info:
        decode({"data": 1}, channel=channel)
    assert info.value.code == "bad_channel"


@pytest.mark.parametrize(
    "channel", ["a", "a" * 200, "private-orders.1", "user@x", "k=v#frag/x:y", "A_b-C.9"]
)
def test_good_channel_names(channel: str) -> None:
    assert decode({"data": 1}, channel=channel).channel == channel
