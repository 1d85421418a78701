"""Redis stream ingest: one XREAD reader per process, reading on from its last id.

Stream ids are the event ids, identical on every broker instance, so a
client can resume anywhere. After an error the reader reconnects and reads
on from the last id it handled: an outage leaves no hole.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream id, fields) as redis-py returns them

BATCH = 1000
BLOCK_MS = 1000


def stream_seq(id: str) -> int | None:
    """A stream id as one order-preserving int (``ms << 64 | seq``); None when malformed."""
    ms, sep, seq = id.partition("-")
    if not (sep and ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return None
    return (int(ms) << 64) | int(seq)


class StreamIngest:
    """Reads ``stream_key`` with XREAD forever, handing each entry to ``on_entry``.

    ``on_start(last_id)`` is called once with the stream's last id before the
    first read (the instance's history starts there); ``after_batch`` is
    awaited after each batch (retained-state writes).
    """

    def __init__(
        self,
        client: Callable[[], aioredis.Redis],
        stream_key: str,
        on_entry: Callable[[str, dict[bytes, bytes]], None],
        on_start: Callable[[str], None],
        after_batch: Callable[[], Awaitable[None]],
        on_state: Callable[[bool], None],
        *,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        self._client = client
        self.stream_key = stream_key
        self._on_entry = on_entry
        self._on_start = on_start
        self._after_batch = after_batch
        self._on_state = on_state
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self.position: str | None = None
        self.subscribed = False

    async def _start_position(self, client: aioredis.Redis) -> str:
        last = cast(list[Entry], await client.xrevrange(self.stream_key, count=1))
        return last[0][0].decode() if last else "0-0"

    async def run(self) -> None:
        backoff = self._backoff_min
        while True:
            client = self._client()
            try:
                if self.position is None:
                    self.position = await self._start_position(client)
                    self._on_start(self.position)
                self.subscribed = True
                self._on_state(True)
                log.info("reading stream %s from %s", self.stream_key, self.position)
                backoff = self._backoff_min
                while True:
                    reply = cast(
                        list[tuple[bytes, list[Entry]]],
                        await client.xread(
                            {self.stream_key: self.position}, count=BATCH, block=BLOCK_MS
                        ),
                    )
                    for _key, entries in reply:
                        for raw_id, fields in entries:
                            self.position = raw_id.decode()
                            self._on_entry(self.position, fields)
                    if reply:
                        await self._after_batch()
            except (RedisError, OSError) as exc:
                log.warning(
                    "redis stream %s: read failed (%s); retrying in about %.1fs",
                    self.stream_key,
                    exc,
                    backoff,
                )
            finally:
                if self.subscribed:
                    self.subscribed = False
                    self._on_state(False)
                await client.aclose()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self._backoff_max)
