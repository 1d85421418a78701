"""Decoding what publishers send into :class:`Event` values, free of I/O.

Every rejection raises :class:`~broker.errors.Rejected` whose ``code`` is the
``reason`` label of ``sse_broker_events_rejected_total`` (a small fixed set, so
the metric's cardinality stays bounded).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from broker import sse
from broker.errors import Rejected
from broker.ids import ID_RULE, as_id, is_id

CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-.:@=#/]{1,200}")
CHANNEL_RULE = "1-200 characters from A-Z a-z 0-9 _ - . : @ = # /"
RESERVED_PREFIX = "broker."
MAX_EVENT_NAME = 200
_JSON_SPACE = (b" ", b"\t", b"\r", b"\n")


class Event(NamedTuple):
    """One event as decoded from a publisher, before the broker gives it an id.

    Immutable like the frozen dataclasses elsewhere, but a NamedTuple: one is
    built per ingested event, and a frozen dataclass's ``__init__`` costs
    ~2.4 µs against ~0.8 µs here (a third of the per-event ingest budget).

    ``data`` is the text sent to clients (compact JSON, or the string verbatim).
    ``tenant``/``users`` restrict the audience; ints from PHP arrive as their
    decimal strings. ``retain`` is the retained-state key, if any; ``deletes``
    marks a retained key's removal (``data: null`` with ``retain``).
    """

    channel: str
    data: str
    event: str = "message"
    tenant: str | None = None
    users: frozenset[str] | None = None
    retain: str | None = None
    deletes: bool = False
    socket: str | None = None  # Laravel's socket id: not echoed to that socket (toOthers)


def valid_channel(name: str) -> bool:
    return CHANNEL_RE.fullmatch(name) is not None


# Names repeat from message to message: remember the valid ones (bounded).
_KNOWN_GOOD: set[str] = set()
_KNOWN_GOOD_EVENTS: set[str] = set()
_MAX_KNOWN = 20_000


def _remember(name: str) -> None:
    if len(_KNOWN_GOOD) >= _MAX_KNOWN:
        _KNOWN_GOOD.clear()
    _KNOWN_GOOD.add(name)


def check_channel(name: str) -> str:
    """``name`` itself when it is a valid channel name; Rejected (``bad_channel``) otherwise."""
    if name in _KNOWN_GOOD:
        return name
    if not valid_channel(name):
        raise Rejected(f"invalid channel name {name[:220]!r}: {CHANNEL_RULE}", code="bad_channel")
    _remember(name)
    return name


def _id_string(value: Any, field: str, code: str) -> str:
    return as_id(value, lambda why: Rejected(f"field {field!r}: {why}", code=code))


def _event_name(value: Any) -> str:
    if type(value) is str and value in _KNOWN_GOOD_EVENTS:
        return value
    if not isinstance(value, str) or not value or len(value) > MAX_EVENT_NAME:
        raise Rejected(
            f"field 'event' must be a string of 1-{MAX_EVENT_NAME} characters", code="bad_event"
        )
    if "\r" in value or "\n" in value or "\0" in value:
        raise Rejected("field 'event' must not contain CR, LF or NUL", code="bad_event")
    if value.startswith(RESERVED_PREFIX):
        raise Rejected(
            f"event names starting {RESERVED_PREFIX!r} are reserved: {value!r}",
            code="reserved_event",
        )
    if len(_KNOWN_GOOD_EVENTS) >= _MAX_KNOWN:
        _KNOWN_GOOD_EVENTS.clear()
    _KNOWN_GOOD_EVENTS.add(value)
    return value


def from_fields(channel: str, fields: dict[str, Any]) -> Event:
    """Validate envelope fields (already parsed JSON) into an Event."""
    event = _event_name(fields["event"]) if fields.get("event") is not None else "message"
    tenant = fields.get("tenant")
    if tenant is not None:
        tenant = _id_string(tenant, "tenant", "bad_tenant")
    users_raw = fields.get("users")
    users: frozenset[str] | None = None
    if users_raw is not None:
        if not isinstance(users_raw, list) or not users_raw:
            raise Rejected("field 'users' must be a non-empty list", code="bad_users")
        users = frozenset(_id_string(u, "users", "bad_users") for u in users_raw)
    retain_raw = fields.get("retain")
    retain: str | None = None
    if retain_raw is True:
        retain = event
    elif isinstance(retain_raw, str) and is_id(retain_raw):
        retain = retain_raw  # stored as "<tenant>\0<key>": no NUL, like an id
    elif retain_raw is not None and retain_raw is not False:
        raise Rejected(f"field 'retain' must be true or {ID_RULE}", code="bad_retain")
    if retain is not None and users is not None:
        raise Rejected(
            "field 'retain' cannot be combined with 'users' (retained state is per channel "
            "and tenant)",
            code="retain_with_users",
        )
    data = fields["data"]
    # Positional: a NamedTuple built from keywords costs noticeably more, per event.
    return Event(
        channel,
        data if type(data) is str else orjson.dumps(data).decode(),
        event,
        tenant,
        users,
        retain,
        retain is not None and data is None,
    )


def decode_native(channel: str, payload: bytes, max_bytes: int) -> Event:
    """Decode one Redis message of the native format.

    A JSON object with a ``data`` key is an envelope; anything else is delivered
    whole as text with event ``message`` (so ``redis-cli PUBLISH sse:news hi``
    works). Raises Rejected for bad channels, oversize or non-UTF-8 payloads and
    envelopes whose fields have the wrong types.
    """
    if len(payload) > max_bytes:
        raise Rejected(
            f"message of {len(payload)} bytes exceeds limits.max_event_bytes = {max_bytes}",
            code="too_large",
        )
    check_channel(channel)
    if payload[:1] == b"{" or (payload[:1] in _JSON_SPACE and payload.lstrip()[:1] == b"{"):
        try:
            fields = orjson.loads(payload)
        except orjson.JSONDecodeError:
            fields = None
        if isinstance(fields, dict) and "data" in fields:
            return from_fields(channel, fields)
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        raise Rejected("message is not valid UTF-8", code="bad_encoding") from None
    return Event(channel=channel, data=text)


def decode_laravel(channel: str, payload: bytes, max_bytes: int) -> Event:
    """Decode what Laravel's Redis broadcaster publishes: ``{"event", "data", "socket"}``.

    ``data`` is sent as compact JSON (an empty PHP array arrives as ``[]``);
    a ``socket`` key inside ``data`` (older Laravel) or beside it marks the
    tab that caused the event, which ``toOthers()`` must not echo to.

    Top-level ``tenant``, ``users`` and ``retain`` restrict the audience and
    keep retained state exactly as in the native format: validated by
    :func:`from_fields`, rejected with the same reasons, ``data: null`` with
    ``retain`` deletes the key. Laravel itself never sends them (so stock apps
    are unaffected); ``POST /publish`` and ``sse-broker publish`` do (see
    :func:`encode_laravel`). The same keys inside ``data`` are the app's data.
    """
    if len(payload) > max_bytes:
        raise Rejected(
            f"message of {len(payload)} bytes exceeds limits.max_event_bytes = {max_bytes}",
            code="too_large",
        )
    check_channel(channel)
    try:
        fields = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise Rejected("not a Laravel broadcast: not JSON", code="bad_envelope") from None
    if not isinstance(fields, dict) or "event" not in fields:
        raise Rejected(
            "not a Laravel broadcast: expected an object with 'event'", code="bad_envelope"
        )
    event = _event_name(fields["event"])
    data = fields.get("data", [])
    socket = fields.get("socket")
    if isinstance(data, dict) and "socket" in data:
        data = dict(data)
        socket = data.pop("socket") or socket
    if socket is not None and not isinstance(socket, str):
        raise Rejected("field 'socket' must be a string or null", code="bad_envelope")
    text = orjson.dumps(data).decode()
    if "tenant" in fields or "users" in fields or "retain" in fields:
        # One copy of the audience and retain rules: the native ones. The data
        # goes in as its JSON text, which from_fields keeps verbatim.
        audience = {k: fields.get(k) for k in ("tenant", "users", "retain")}
        restricted = from_fields(channel, {"event": event, "data": text, **audience})
        return restricted._replace(
            socket=socket or None, deletes=restricted.retain is not None and data is None
        )
    return Event(channel, text, event, socket=socket or None)


def _with_audience(fields: dict[str, Any], event: Event) -> dict[str, Any]:
    """``fields`` plus the event's ``tenant``, ``users`` and ``retain``, when set."""
    if event.tenant is not None:
        fields["tenant"] = event.tenant
    if event.users is not None:
        fields["users"] = sorted(event.users)
    if event.retain is not None:
        fields["retain"] = event.retain
    if event.socket is not None:
        fields["socket"] = event.socket
    return fields


def encode_native(event: Event) -> bytes:
    """The native-format message that decodes back to ``event`` (the inverse of decode_native)."""
    fields: dict[str, Any] = {"data": None if event.deletes else event.data}
    if event.event != "message":
        fields["event"] = event.event
    return orjson.dumps(_with_audience(fields, event))


def encode_laravel(event: Event) -> bytes:
    """The Laravel-format message for ``event``: what :func:`decode_laravel` reads back.

    Laravel's broadcaster shape ``{"event": E, "data": D, "socket": S}`` plus
    top-level ``tenant``, ``users`` and ``retain`` when set (Laravel never
    sends those; the decoder honours them with the native rules, so a
    targeted event published in this format stays targeted).

    In this format clients always get ``data`` as JSON (the decoder re-encodes
    it), so D is the JSON value ``event.data`` holds when it parses as JSON --
    compact JSON, as the native format stores non-string data, reads back
    byte for byte -- and otherwise the string itself, which clients then get
    as a JSON string (``hello`` arrives as ``"hello"``). A retained key's
    deletion is ``data: null``; as in a stream entry, a retained event whose
    data is the text ``null`` reads back as a deletion.
    """
    data: Any = None
    if not event.deletes:
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            data = event.data
    fields: dict[str, Any] = {"event": event.event, "data": data, "socket": event.socket}
    return orjson.dumps(_with_audience(fields, event))


def encode_stream(event: Event) -> dict[str, str]:
    """The stream-entry fields that decode back to ``event`` (the inverse of decode_stream)."""
    fields = {"channel": event.channel, "data": "null" if event.deletes else event.data}
    if event.event != "message":
        fields["event"] = event.event
    if event.tenant is not None:
        fields["tenant"] = event.tenant
    if event.users is not None:
        fields["users"] = orjson.dumps(sorted(event.users)).decode()
    if event.retain is not None:
        fields["retain"] = event.retain
    if event.socket is not None:
        fields["socket"] = event.socket
    return fields


def decode_stream(fields: dict[bytes, bytes], max_bytes: int) -> Event:
    """Decode one stream entry: ``channel C event E data D [tenant T] [users U] [retain K]``.

    All values are strings: ``data`` is sent verbatim (publishers json_encode
    it), ``users`` is a JSON array, ``retain`` a key; ``data`` ``null`` with
    ``retain`` deletes the key.
    """
    # The channel is addressing, not payload (as in pub/sub, where it is not
    # part of the message): a stream entry and the native message carrying
    # the same event then measure alike, the stream one never larger.
    size = sum(len(k) + len(v) for k, v in fields.items() if k != b"channel")
    if size > max_bytes:
        raise Rejected(
            f"stream entry of {size} bytes exceeds limits.max_event_bytes = {max_bytes}",
            code="too_large",
        )
    try:
        text = {k.decode(): v.decode() for k, v in fields.items()}
    except UnicodeDecodeError:
        raise Rejected("stream entry is not valid UTF-8", code="bad_encoding") from None
    channel = check_channel(text.get("channel", ""))
    if "data" not in text:
        raise Rejected("stream entry has no 'data' field", code="bad_data")
    parsed: dict[str, Any] = {"data": text["data"]}
    for name in ("event", "tenant", "retain"):
        if name in text:
            parsed[name] = text[name]
    if "users" in text:
        try:
            parsed["users"] = orjson.loads(text["users"])
        except orjson.JSONDecodeError:
            raise Rejected("field 'users' must be a JSON array", code="bad_users") from None
    event = from_fields(channel, parsed)
    if "socket" in text:  # Laravel's socket id, carried over by the bridge (toOthers)
        event = event._replace(socket=text["socket"] or None)
    if event.retain is not None and text["data"] == "null":
        return event._replace(deletes=True)
    return event


# ``[ingest] format`` -> the decoder of pub/sub messages.
DECODERS: dict[str, Callable[[str, bytes, int], Event]] = {
    "native": decode_native,
    "laravel": decode_laravel,
}


class Published:
    """An event after the broker accepted it: its position, its id and its wire bytes.

    ``frame`` is the SSE frame, built here once; ``chunk`` is the same frame
    as one HTTP/1.1 chunk, built when the event first reaches a subscriber
    (an event nobody subscribes to never needs it). ``size`` counts both, as
    history memory.
    """

    __slots__ = ("_chunk", "event", "frame", "id", "ingested_at", "seq", "size")

    def __init__(self, event: Event, seq: int, id: str, ingested_at: float) -> None:
        self.event = event
        self.seq = seq
        self.id = id
        self.ingested_at = ingested_at
        # Event names were validated on the way in and ids are ours (or Redis's).
        self.frame = frame = sse.encode_trusted(event.data, event.event, id)
        self._chunk: bytes | None = None
        n = len(frame)
        self.size = 2 * n + len(b"%x\r\n\r\n" % n)

    @property
    def chunk(self) -> bytes:
        if self._chunk is None:
            self._chunk = sse.chunk(self.frame)
        return self._chunk
