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

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from broker.ids import split_event_id

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream id, fields) as redis-py returns them

BATCH = 1000
BLOCK_MS = 1000


MAX_SEQ = (1 << 64) - 1


def previous_id(id: str) -> str:
    """The greatest possible stream id before ``id`` (a valid resume position)."""
    ms, _, seq = id.partition("-")
    if int(seq):
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-{MAX_SEQ}" if int(ms) else "0-0"


def stream_seq(id: str) -> int | None:
    """A stream id as one order-preserving int (``ms << 64 | seq``); None when malformed."""
    parts = split_event_id(id)
    if parts is None:
        return None
    return (parts[0] << 64) | parts[1]


class StreamIngest:
    """Reads ``stream_key`` with XREAD forever, handing each entry to ``on_entry``.

    ``on_start(last_id)`` is called once with the stream's last id before the
    first read (the instance's history starts there); ``after_batch`` is
    awaited after each batch (retained-state writes); ``on_gap(id)`` reports
    that entries up to ``id`` were trimmed before this reader got them.
    """

    def __init__(
        self,
        client: Callable[[], aioredis.Redis],
        stream_key: str,
        on_entry: Callable[[str, dict[bytes, bytes]], None],
        on_start: Callable[[str], None],
        after_batch: Callable[[], Awaitable[None]],
        on_state: Callable[[bool], None],
        on_gap: Callable[[str], None],
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
        self._on_gap = on_gap
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self.position: str | None = None
        self.subscribed = False
        self._added_at_start = 0  # the stream's entries-added when position was set
        self._read_count = 0  # entries read since then

    async def _start_position(self, client: aioredis.Redis) -> str:
        # The last id ever generated, not the last entry: a stream trimmed to
        # nothing still knows where it stood, and a client resuming from
        # there must not look like it comes from the future.
        try:
            info = await client.xinfo_stream(self.stream_key)
        except ResponseError:
            return "0-0"  # no stream yet
        self._added_at_start = int(info.get("entries-added", 0))
        return bytes(info["last-generated-id"]).decode()

    async def _read(self, client: aioredis.Redis) -> list[Entry]:
        """The next batch after ``position``; reports entries trimmed before we read them.

        Trimming removes the oldest entries first, so while any entry at or
        before our position remains, nothing after it was removed. The check
        and the read run in one MULTI: both describe the same moment. When
        nothing before us remains, XINFO's counters tell how many entries
        after our position were removed unread (``entries-added`` minus what
        we read minus what is still there).
        """
        pos = self.position
        assert pos is not None
        pipe = client.pipeline(transaction=True)
        _ = pipe.xrevrange(self.stream_key, pos, "-", count=1)
        _ = pipe.xread({self.stream_key: pos}, count=BATCH)
        before, reply = await pipe.execute()
        entries: list[Entry] = reply[0][1] if reply else []
        if not before and pos != "0-0" and await self._lost_unread(client):
            # Resume point for clients: just before the first entry still there.
            gap = previous_id(entries[0][0].decode()) if entries else pos
            log.warning(
                "stream %s was trimmed past this reader's position %s: entries were lost to it",
                self.stream_key,
                pos,
            )
            self._on_gap(gap)
        self._read_count += len(entries)
        return entries

    async def _lost_unread(self, client: aioredis.Redis) -> bool:
        try:
            info = await client.xinfo_stream(self.stream_key)
        except ResponseError:
            return True  # the stream itself was deleted under us
        added = info.get("entries-added")
        if added is None:  # Redis < 7: no counter; assume the worst
            return True
        return int(added) - self._added_at_start - self._read_count - int(info["length"]) > 0

    async def run(self) -> None:
        backoff = self._backoff_min
        while True:
            client = self._client()
            try:
                if self.position is None:
                    self.position = await self._start_position(client)
                    self._on_start(self.position)
                await client.ping()  # connected means a round trip worked, not a client object
                self.subscribed = True
                self._on_state(True)
                log.info("reading stream %s from %s", self.stream_key, self.position)
                backoff = self._backoff_min
                while True:
                    entries = await self._read(client)
                    if not entries:
                        # Wait for news; the next _read fetches it.
                        _ = await client.xread(
                            {self.stream_key: self.position}, count=1, block=BLOCK_MS
                        )
                        continue
                    for raw_id, fields in entries:
                        self.position = raw_id.decode()
                        self._on_entry(self.position, fields)
                    await self._after_batch()
            except (RedisError, OSError, TimeoutError) as exc:
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
