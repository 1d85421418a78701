"""The broker's own control events (``broker.*``), encoded like any other frame."""

from __future__ import annotations

import random

import orjson

from broker import sse

RESET = "broker.reset"
RECONNECT = "broker.reconnect"


def jitter(ms: int, spread: float = 0.5) -> int:
    """``ms`` scaled by a random factor in [1 - spread, 1 + spread]: no thundering herd."""
    return max(0, round(ms * random.uniform(1 - spread, 1 + spread)))


def reset_frame(reason: str, head: str, refetch_after_ms: int) -> bytes:
    """``broker.reset``: the client lost events and should refetch its state."""
    data = orjson.dumps({"reason": reason, "refetch_after_ms": refetch_after_ms}).decode()
    return sse.encode_event(data, event=RESET, id=head)


def reconnect_frame(reason: str, retry_ms: int, head: str | None) -> bytes:
    """``broker.reconnect``: the broker closes this stream on purpose; come back in ``retry_ms``."""
    data = orjson.dumps({"reason": reason, "retry_ms": retry_ms}).decode()
    return sse.encode_retry(retry_ms) + sse.encode_event(data, event=RECONNECT, id=head)
