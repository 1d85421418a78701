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
_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\0]")

HEARTBEAT = b":\n\n"


def _check_field(name: str, value: str) -> None:
    if _FORBIDDEN_IN_FIELD.search(value):
        raise ValueError(f"SSE {name} must not contain CR, LF or NUL: {value!r}")


def encode_event(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    """Encode one event: ``id:``, ``event:``, one ``data:`` line per line of ``data``.

    ``event`` None (or ``"message"``, the browser's default) omits the field.
    Raises ValueError when ``event`` or ``id`` holds CR, LF or NUL.
    """
    parts: list[str] = []
    if id is not None:
        _check_field("id", id)
        parts.append(f"id: {id}\n")
    if event is not None and event != "message":
        _check_field("event", event)
        parts.append(f"event: {event}\n")
    if "\n" in data or "\r" in data:
        for line in _LINE_BREAK.split(data):
            parts.append(f"data: {line}\n")
    else:
        parts.append(f"data: {data}\n")
    parts.append("\n")
    return "".join(parts).encode()


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
