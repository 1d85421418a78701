"""Ids from outside: user and tenant ids (who sees what) and event ids (where to resume).

A user or tenant id reaches the broker from tokens, the app's auth answers,
publishers' envelopes, stream entries and what the broker itself wrote to
Redis. Every one of those paths reads it through :func:`as_id`, so an id is
always a non-empty string of at most :data:`MAX_ID_LENGTH` characters with no
control characters: a NUL cannot split a Redis field (``tenant\\0key``), a
newline cannot forge a log line, and a megabyte of "user id" cannot sit in
every cache key. Integers (PHP's ``$user->id``) become their decimal form.

Pure: no I/O, no broker imports, so decoders and auth share it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

MAX_ID_LENGTH = 256
ID_RULE = f"a non-empty string of at most {MAX_ID_LENGTH} characters without control characters"

# C0, DEL, C1 and the Unicode line/paragraph separators (some log viewers
# break lines on them).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MAX_INT = 10**MAX_ID_LENGTH


class InvalidId(ValueError):
    """A value that is not a usable user or tenant id; the message says why."""


def as_id(value: object, refuse: Callable[[str], Exception] = InvalidId) -> str:
    """``value`` as an id; otherwise raises ``refuse(why)``.

    Accepts a string that is :data:`ID_RULE` or an integer (not a bool: PHP's
    ``true`` must not become the id ``"True"``). ``refuse`` turns the reason
    into the caller's own error (naming its field, carrying its status and
    code); by default it is :class:`InvalidId`.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        # Bounded before str(): Python refuses to print ints past 4300 digits.
        if -_MAX_INT < value < _MAX_INT:
            return str(value)
        raise refuse(f"expected {ID_RULE} (an integer that long is not an id)")
    if not isinstance(value, str):
        raise refuse(f"expected {ID_RULE} or an integer, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_LENGTH or _CONTROL.search(value):
        raise refuse(f"expected {ID_RULE}")
    return value


def is_id(value: str) -> bool:
    """Whether ``value`` (a string already) is a valid id."""
    return 0 < len(value) <= MAX_ID_LENGTH and _CONTROL.search(value) is None


# Event ids, the broker's ``p<epoch>-<seq>`` (past its ``p``) and Redis stream
# ids ``<ms>-<seq>`` alike: two unsigned 64-bit numbers. Checked before any int() so that a
# client's ``Last-Event-ID`` of 5,000 digits costs a regex, not a ValueError
# (Python refuses to parse ints past 4,300 digits).
_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64 = (1 << 64) - 1


def split_event_id(value: str) -> tuple[int, int] | None:
    """``(first, second)`` of an ``<n>-<n>`` id of two 64-bit numbers; None otherwise."""
    match = _EVENT_ID.fullmatch(value)
    if match is None:
        return None
    first, second = int(match[1]), int(match[2])
    if first > _U64 or second > _U64:
        return None
    return first, second
