"""User and tenant ids: the values that decide who sees what, from any source.

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

MAX_ID_LENGTH = 256
ID_RULE = f"a non-empty string of at most {MAX_ID_LENGTH} characters without control characters"

# C0, DEL, C1 and the Unicode line/paragraph separators (some log viewers
# break lines on them).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MAX_INT = 10**MAX_ID_LENGTH


class InvalidId(ValueError):
    """A value that is not a usable user or tenant id; the message says why."""


def as_id(value: object) -> str:
    """``value`` as an id, or InvalidId.

    Accepts a string that is :data:`ID_RULE` or an integer (not a bool: PHP's
    ``true`` must not become the id ``"True"``).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        # Bounded before str(): Python refuses to print ints past 4300 digits.
        if -_MAX_INT < value < _MAX_INT:
            return str(value)
        raise InvalidId(f"expected {ID_RULE} (an integer that long is not an id)")
    if not isinstance(value, str):
        raise InvalidId(f"expected {ID_RULE} or an integer, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_LENGTH or _CONTROL.search(value):
        raise InvalidId(f"expected {ID_RULE}")
    return value


def is_id(value: str) -> bool:
    """Whether ``value`` (a string already) is a valid id."""
    return 0 < len(value) <= MAX_ID_LENGTH and _CONTROL.search(value) is None
