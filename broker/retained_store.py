"""Retained state in Redis beside the stream (stream mode).

Every broker instance reading the stream writes each retained event it reads
with a compare-and-set on the stream id (a later id wins, an earlier one is a
no-op), so all instances converge on the same state, it survives restarts
and trimming, and a deletion leaves a tombstone that an instance lagging
behind cannot overwrite with an older value.

Layout: one hash per channel, ``<stream_key>:retained:<channel>``; field
``<tenant>\\0<key>`` (tenant empty for channel-wide state); value
``<stream id> <json {"event", "data"}>`` or ``<stream id> -`` for a deletion.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import redis.asyncio as aioredis

from broker.envelope import Published, from_fields
from broker.errors import Rejected
from broker.positions import stream_seq

_CAS = """
local function parse(id)
  local ms, sq = string.match(id, '^(%d+)%-(%d+)$')
  return tonumber(ms), tonumber(sq)
end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local cm, cs = parse(string.match(cur, '^(%S+)'))
  local nm, ns = parse(ARGV[2])
  if nm < cm or (nm == cm and ns <= cs) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
return 1
"""

TOMBSTONE = b"-"

log = logging.getLogger(__name__)


class RedisRetained:
    def __init__(self, stream_key: str) -> None:
        self.prefix = f"{stream_key}:retained:"
        self._pending: list[Published] = []

    def hash_key(self, channel: str) -> str:
        return self.prefix + channel

    def add(self, pub: Published) -> None:
        """Queue a retained event read from the stream; written by :meth:`flush`."""
        self._pending.append(pub)

    async def flush(self, client: aioredis.Redis) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        pipe = client.pipeline(transaction=False)
        for pub in batch:
            event = pub.event
            value = (
                TOMBSTONE
                if event.deletes
                else orjson.dumps({"event": event.event, "data": event.data})
            )
            field = f"{event.tenant or ''}\0{event.retain}"
            _ = pipe.eval(_CAS, 1, self.hash_key(event.channel), field, pub.id, value)
        try:
            await pipe.execute()
        except BaseException:
            self._pending[:0] = batch  # written on the next flush, in order
            raise

    async def load(self, client: aioredis.Redis, channels: tuple[str, ...]) -> list[Published]:
        """Every retained entry (tombstones included) of ``channels``, as Published events.

        What Redis holds is read like inbound data: anyone with write access
        to Redis can put anything there, so an entry that would not have been
        accepted from a publisher (a bad tenant, event name or shape) is
        skipped and logged, never delivered.
        """
        pipe = client.pipeline(transaction=False)
        for channel in channels:
            _ = pipe.hgetall(self.hash_key(channel))
        found: list[Published] = []
        bad = 0
        for channel, entries in zip(channels, await pipe.execute(), strict=True):
            for field, value in entries.items():
                try:
                    found.append(_entry(channel, field, value))
                except (Rejected, ValueError, KeyError, TypeError):
                    bad += 1
        if bad:
            log.warning(
                "skipped %d malformed retained entries in %s* (not written by a broker)",
                bad,
                self.prefix,
            )
        return found


def _entry(channel: str, field: bytes, value: bytes) -> Published:
    """One hash entry as a Published event; raises for anything malformed."""
    tenant, _, key = field.decode().partition("\0")
    id, _, body = value.partition(b" ")
    stream_id = id.decode()
    seq = stream_seq(stream_id)
    if seq is None:
        raise ValueError("not a stream id")
    fields: dict[str, Any] = {"retain": key, "tenant": tenant or None}
    if body == TOMBSTONE:
        fields["data"] = None
    else:
        doc = orjson.loads(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), str):
            raise ValueError("not a retained event")
        fields["event"] = doc.get("event")
        fields["data"] = doc["data"]
    return Published(from_fields(channel, fields), seq, stream_id, 0.0)
