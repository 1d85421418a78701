"""Publishing into Redis for ``POST /publish`` and ``sse-broker publish``.

Events are written to Redis in the configured mode (never delivered
locally), so every broker instance on that Redis delivers them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis

from broker.config import Config, IngestConfig, read_config_file
from broker.envelope import (
    Event,
    check_channel,
    encode_laravel,
    encode_native,
    encode_stream,
    from_fields,
)
from broker.errors import BadRequest, Rejected
from broker.keyfiles import parse_words

MAX_ITEMS = 1000


def load_publish_keys(cfg: Config) -> tuple[str, ...]:
    """``publish.keys`` plus the keys of ``publish.keys_file`` (one word per line,
    blank and ``#`` lines ignored); ConfigError naming the file and line otherwise."""
    keys = list(cfg.publish.keys)
    if cfg.publish.keys_file:
        name, path = "publish.keys_file", cfg.publish.keys_file
        keys.extend(parse_words(name, path, read_config_file(name, path)))
    return tuple(keys)


def parse_items(
    body: bytes, max_event_bytes: int, ingest: IngestConfig | None = None
) -> list[Event]:
    """Validate a publish body: one envelope with a ``channel`` field, or a list of them.

    Raises BadRequest naming the item and the field; nothing is published
    unless every item is valid. Each event's size is measured as the reader
    of ``ingest`` (the config's ``[ingest]``) measures what
    :func:`publish_events` writes for it, so an accepted event is never
    dropped as too large on the way; without ``ingest``, as a native message.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}", code="bad_json") from None
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise BadRequest("empty list: nothing to publish", code="no_events")
    if len(items) > MAX_ITEMS:
        raise BadRequest(
            f"{len(items)} events in one request; at most {MAX_ITEMS}", code="too_many"
        )
    many = len(items) > 1
    return [_item(i, item, max_event_bytes, many, ingest) for i, item in enumerate(items)]


def _item(
    index: int, item: Any, max_event_bytes: int, many: bool, ingest: IngestConfig | None
) -> Event:
    where = f"item {index}: " if many else ""
    if not isinstance(item, dict):
        raise BadRequest(f"{where}expected a JSON object", code="bad_envelope")
    channel = item.get("channel")
    if not isinstance(channel, str):
        raise BadRequest(f"{where}field 'channel' must be a string", code="bad_channel")
    if "data" not in item:
        raise BadRequest(f"{where}field 'data' is required", code="bad_data")
    try:
        event = from_fields(check_channel(channel), item)
    except Rejected as exc:
        raise BadRequest(where + exc.message, code=exc.code) from None
    size = _published_size(event, ingest)
    if size > max_event_bytes:
        raise BadRequest(
            f"{where}event of {size} bytes exceeds limits.max_event_bytes = {max_event_bytes}",
            code="too_large",
        )
    return event


def _message_encoder(ingest: IngestConfig | None) -> Callable[[Event], bytes]:
    """The pub/sub message format the ingest reads: Laravel's, or the native envelope."""
    return encode_laravel if ingest is not None and ingest.format == "laravel" else encode_native


def _published_size(event: Event, ingest: IngestConfig | None) -> int:
    """The size the reader checks against ``limits.max_event_bytes`` for what is written."""
    if ingest is not None and ingest.mode == "stream":
        # decode_stream's measure: every field but the channel (addressing), in bytes
        fields = encode_stream(event)
        return sum(len(k.encode()) + len(v.encode()) for k, v in fields.items() if k != "channel")
    return len(_message_encoder(ingest)(event))


async def publish_events(client: aioredis.Redis, cfg: Config, events: list[Event]) -> list[str]:
    """Write ``events`` to Redis in one pipeline; the stream ids in stream mode, else []."""
    pipe = client.pipeline(transaction=False)
    stream = cfg.ingest.mode == "stream"
    # In the format the ingest reads: a native envelope read as a Laravel
    # broadcast would lose its audience (tenant, users) and double-encode data.
    encode = _message_encoder(cfg.ingest)
    # Publishers trim as they add: keep what the replay window needs.
    min_id = f"{int(time.time() * 1000) - cfg.replay.ttl_seconds * 1000}-0"
    for event in events:
        if stream:
            _ = pipe.xadd(
                cfg.ingest.stream_key,
                encode_stream(event),  # type: ignore[arg-type]
                minid=min_id,
                approximate=True,
            )
        else:
            _ = pipe.publish(cfg.ingest.prefix + event.channel, encode(event))
    results = await pipe.execute()
    return [r.decode() if isinstance(r, bytes) else str(r) for r in results] if stream else []
