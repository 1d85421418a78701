"""Redis stream ingest: one XREAD reader per process, reading on from its last id.

Stream ids are the event ids, identical on every broker instance, so a
client can resume anywhere. After an error the reader reconnects and reads
on from the last id it handled: an outage leaves no hole.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from broker.ingest import Backoff, Context, ReadsEveryChannel, Sink, raise_if_cancelled
from broker.positions import Entry, StreamIds, previous_id, stream_seq
from broker.redis_conn import RedisTarget

log = logging.getLogger(__name__)


BATCH = 1000
BLOCK_MS = 1000


class StreamIngest(ReadsEveryChannel):
    """Reads ``stream_key`` with XREAD forever, reporting each entry to the sink.

    Before the first read the sink hears ``started(last id)`` (this
    instance's history starts there); ``settle()`` after each batch; and
    ``gap("expired", upto=id)`` when entries up to ``id`` were trimmed
    before this reader got them.

    Liveness: each check asks Redis (on a client of its own, without
    redis-py's silent retries) whether the stream moved past a reader that
    did not; a dead Redis shows there within one interval, while the blocked
    reader may ride a short outage out on its retries without a hole.
    """

    def __init__(self, target: RedisTarget, stream_key: str) -> None:
        self.target = target
        self.stream_key = stream_key
        self.scheme = StreamIds()
        self.position: str | None = None
        self.subscribed = False
        self._added_at_start = 0  # the stream's entries-added when position was set
        self._read_count = 0  # entries read since then
        self._probe: aioredis.Redis | None = None
        self._checked = -1  # the position the last check saw

    def _client(self) -> aioredis.Redis:
        # No silent retries: a dead connection must surface at once, so
        # readiness tells the truth and the reader reconnects itself.
        return self.target.client(socket_keepalive=True)

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

    async def _read(self, client: aioredis.Redis, sink: Sink) -> list[Entry]:
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
            sink.gap("expired", upto=gap)
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

    async def run(self, sink: Sink) -> None:
        backoff = Backoff()
        while True:
            raise_if_cancelled()
            client = self._client()
            try:
                if self.position is None:
                    self.position = await self._start_position(client)
                    sink.started(self.position)
                await client.ping()  # connected means a round trip worked, not a client object
                self.subscribed = True
                sink.connected(True)
                log.info("reading stream %s from %s", self.stream_key, self.position)
                backoff.reset()
                while True:
                    raise_if_cancelled()
                    entries = await self._read(client, sink)
                    if not entries:
                        # Wait for news; the next _read fetches it.
                        _ = await client.xread(
                            {self.stream_key: self.position}, count=1, block=BLOCK_MS
                        )
                        continue
                    for raw_id, fields in entries:
                        self.position = raw_id.decode()
                        sink.entry(self.position, fields)
                    await sink.settle()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning(
                    "redis stream %s: read failed (%s); retrying in about %.1fs",
                    self.stream_key,
                    exc,
                    backoff.current,
                )
            finally:
                if self.subscribed:
                    self.subscribed = False
                    self._checked = -1  # progress is judged afresh after the outage
                    sink.connected(False)
                await client.aclose()
            await backoff.wait()

    # -- liveness -------------------------------------------------------------------

    async def check(self, sink: Sink) -> None:
        if not self.subscribed:
            return
        if self._probe is None:
            self._probe = self.target.client(
                retry=Retry(NoBackoff(), 0), socket_timeout=2.0, socket_connect_timeout=1.0
            )
        try:
            info = await self._probe.xinfo_stream(self.stream_key)
        except ResponseError:
            info = None  # Redis answers; there is just no stream (yet)
        except (RedisError, OSError, TimeoutError) as exc:
            sink.reachable(False, str(exc))
            return
        sink.reachable(True)
        if info is None or self.position is None:
            return
        last = stream_seq(bytes(info["last-generated-id"]).decode()) or 0
        position = stream_seq(self.position) or 0
        if last > position and position == self._checked:
            sink.stalled(f"stream reader stuck at {self.position} while the stream moved on")
        elif position != self._checked:
            sink.moving()
        self._checked = position

    async def close(self) -> None:
        if self._probe is not None:
            await self._probe.aclose()
            self._probe = None


def build(context: Context) -> StreamIngest:
    return StreamIngest(context.target, context.cfg.ingest.stream_key)
