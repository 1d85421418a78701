"""Decoding inbound messages: the native envelope, the raw-text fallback, and the
Laravel shape as ``POST /publish`` writes it (top-level audience fields)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.envelope import (
    Event,
    decode_laravel,
    decode_native,
    encode_laravel,
    from_fields,
)
from broker.errors import Rejected

MAX = 1024

# The reasons of sse_broker_events_rejected_total as the README lists them:
# every decoder rejection must use one of them.
REJECT_REASONS = (
    "too_large",
    "bad_channel",
    "bad_encoding",
    "bad_event",
    "reserved_event",
    "bad_tenant",
    "bad_users",
    "bad_retain",
    "retain_with_users",
    "bad_data",
    "bad_envelope",
)


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


# -- the Laravel shape as publish writes it: encode_laravel / decode_laravel ------------------


def laravel(payload: Any, channel: str = "orders") -> Event:
    return decode_laravel(channel, orjson.dumps(payload), MAX)


@pytest.mark.parametrize(
    "event",
    [
        Event("orders", '{"x":1}', "e"),
        Event("orders", '{"x":1}', "e", users=frozenset({"A"})),
        Event("orders", '[1,"a",null]', tenant="acme"),
        Event("orders", "7", "e", tenant="42", users=frozenset({"1", "2"})),
        Event("orders", "null"),
        Event("orders", "true"),
        Event("orders", '"a JSON string"'),
        Event("orders", '{"note":"Größe 😀 €","a":1.5}'),
        Event("orders", '{"s":1}', "state", tenant="acme", retain="state"),
        Event("orders", "null", "state", tenant="acme", retain="state", deletes=True),
        Event("orders", '{"id":1}', "e", socket="123.456"),
        # what the native rules make of a publish body
        from_fields("orders", {"data": {"id": 42}, "event": "e", "tenant": 7, "users": [1, "b"]}),
        from_fields("orders", {"data": [], "event": "count", "retain": True}),
        from_fields("orders", {"data": None, "retain": "k"}),
    ],
    ids=repr,
)
def test_laravel_round_trip(event: Event) -> None:
    message = encode_laravel(event)
    assert decode_laravel(event.channel, message, MAX) == event
    # Laravel's broadcaster shape: data embedded as JSON, not a JSON string of it
    fields = orjson.loads(message)
    assert list(fields)[:3] == ["event", "data", "socket"]
    assert fields["data"] == (None if event.deletes else orjson.loads(event.data))


@pytest.mark.parametrize(
    ("event", "delivered"),
    [
        # text that is not JSON travels as a JSON string: clients get it quoted
        (Event("orders", "hello"), Event("orders", '"hello"')),
        (Event("orders", "a\nb"), Event("orders", '"a\\nb"')),
        (Event("orders", ""), Event("orders", '""')),
        # JSON text that is not compact reads back compact
        (Event("orders", '{"x": 1} '), Event("orders", '{"x":1}')),
        # a retained text "null" reads back as the deletion (as in a stream entry)
        (Event("orders", "null", retain="k"), Event("orders", "null", retain="k", deletes=True)),
    ],
)
def test_laravel_data_is_always_json(event: Event, delivered: Event) -> None:
    assert decode_laravel("orders", encode_laravel(event), MAX) == delivered


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"event": "e", "data": 1, "tenant": 42}, Event("orders", "1", "e", tenant="42")),
        (
            {"event": "e", "data": {"a": 1}, "users": [1, "2"]},
            Event("orders", '{"a":1}', "e", users=frozenset({"1", "2"})),
        ),
        ({"event": "e", "data": 1, "retain": True}, Event("orders", "1", "e", retain="e")),
        ({"event": "e", "data": 1, "retain": False}, Event("orders", "1", "e")),
        ({"event": "e", "data": 1, "tenant": None, "users": None}, Event("orders", "1", "e")),
        (
            {"event": "e", "data": None, "retain": "k", "tenant": "t"},
            Event("orders", "null", "e", tenant="t", retain="k", deletes=True),
        ),
        ({"event": "e", "retain": "k"}, Event("orders", "[]", "e", retain="k")),
        (
            {"event": "e", "data": {"id": 1, "socket": "1.2"}, "users": ["u"]},
            Event("orders", '{"id":1}', "e", users=frozenset({"u"}), socket="1.2"),
        ),
        # inside data they are the app's data, not an audience
        (
            {"event": "e", "data": {"tenant": "t", "users": ["u"], "retain": "k"}},
            Event("orders", '{"tenant":"t","users":["u"],"retain":"k"}', "e"),
        ),
    ],
)
def test_laravel_top_level_audience_fields(payload: dict[str, Any], expected: Event) -> None:
    assert laravel(payload) == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"tenant": True},
        {"tenant": 1.5},
        {"tenant": ""},
        {"tenant": ["a"]},
        {"tenant": {"id": 1}},
        {"users": []},
        {"users": "bob"},
        {"users": [True]},
        {"users": [None]},
        {"users": [""]},
        {"users": {"0": "a"}},
        {"retain": 3},
        {"retain": ""},
        {"retain": ["k"]},
        {"retain": "k", "users": [1]},
        {"retain": True, "users": ["a"]},
    ],
    ids=repr,
)
def test_laravel_audience_rejections_are_the_native_ones(fields: dict[str, Any]) -> None:
    with pytest.raises(Rejected) as native:
        decode({"data": 1, "event": "e", **fields})
    with pytest.raises(Rejected) as info:
        laravel({"event": "e", "data": 1, "socket": None, **fields})
    assert (info.value.code, info.value.message) == (native.value.code, native.value.message)
    assert info.value.code in REJECT_REASONS
