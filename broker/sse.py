"""Server-Sent Events framing, free of I/O.

Every function returns the exact bytes a client receives. The WHATWG parser
splits fields on CR, LF and CRLF, so nothing a publisher controls may carry
those characters into a field other than ``data`` (whose lines are split into
several ``data:`` fields here) — otherwise a crafted event name or id could
inject fields or whole events into other clients' streams.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(r"\r\n|\r|\n")

HEARTBEAT = b":\n\n"


def _check_field(name: str, value: str) -> str:
    # Substring tests: this runs once per event, and beats a regex on short values.
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"SSE {name} must not contain CR, LF or NUL: {value!r}")
    return value


def _data_fields(data: str) -> str:
    """One ``data:`` field per line of ``data``, split where the client's parser splits."""
    # Substring tests first: most events are one line, and they beat the regex.
    if "\n" in data or "\r" in data:
        return "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    return f"data: {data}\n"


def encode_event(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    """Encode one event: ``id:``, ``event:``, one ``data:`` line per line of ``data``.

    ``event`` None (or ``"message"``, the browser's default) omits the field.
    Raises ValueError when ``event`` or ``id`` holds CR, LF or NUL.
    """
    head = "" if id is None else f"id: {_check_field('id', id)}\n"
    if event is not None and event != "message":
        head += f"event: {_check_field('event', event)}\n"
    return f"{head}{_data_fields(data)}\n".encode()


def encode_trusted(data: str, event: str, id: str) -> bytes:
    """:func:`encode_event` for values already proven safe: an ``event`` name that
    passed envelope validation and an ``id`` the broker made (the hot path
    skips re-checking them). ``data`` is still split into lines here."""
    head = f"id: {id}\n" if event == "message" else f"id: {id}\nevent: {event}\n"
    return f"{head}{_data_fields(data)}\n".encode()


def encode_id(id: str) -> bytes:
    """A block that moves the client's last event id without dispatching an event."""
    _check_field("id", id)
    return f"id: {id}\n\n".encode()


def encode_retry(ms: int) -> bytes:
    """Tell the client how long to wait before reconnecting."""
    if ms < 0:
        raise ValueError(f"retry must be >= 0, got {ms}")
    return f"retry: {ms}\n".encode()


def encode_comment(text: str = "") -> bytes:
    """A comment, ignored by clients; multi-line text becomes several comment lines."""
    return "".join(f":{' ' if line else ''}{line}\n" for line in _LINE_BREAK.split(text)).encode()


def chunk(frame: bytes) -> bytes:
    """Frame bytes as one HTTP/1.1 chunk (the transport is written directly)."""
    return b"%x\r\n%b\r\n" % (len(frame), frame)
