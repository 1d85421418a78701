"""Small helpers shared by the tests: publishing into Redis, reading Prometheus text."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import aiohttp.web
import orjson
import redis.asyncio as aioredis
from sse_client import SSEClient, SSEEvent, SSEStream
from yarl import URL

T = TypeVar("T")


def encode_payload(payload: Any) -> bytes | str:
    """str/bytes go as they are; anything else (dict, list, number) as compact JSON."""
    if isinstance(payload, str | bytes):
        return payload
    return orjson.dumps(payload)


async def publish(
    redis: aioredis.Redis, channel: str, payload: Any, *, prefix: str = "sse:"
) -> int:
    """``PUBLISH <prefix><channel> <payload>``; returns how many subscribers got it."""
    return int(await redis.publish(prefix + channel, encode_payload(payload)))


async def publish_when_subscribed(
    redis: aioredis.Redis,
    channel: str,
    payload: Any,
    *,
    prefix: str = "sse:",
    timeout: float = 5.0,
) -> int:
    """Publish, repeating while no subscriber received it (safe: nobody got a copy)."""
    async with asyncio.timeout(timeout):
        while True:
            receivers = await publish(redis, channel, payload, prefix=prefix)
            if receivers:
                return receivers
            await asyncio.sleep(0.02)


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header carrying ``token``."""
    return {"Authorization": f"Bearer {token}"}


def envelope(
    data: Any,
    *,
    event: str | None = None,
    tenant: str | int | None = None,
    users: list[str | int] | None = None,
    retain: str | bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A native-format envelope with only the given fields."""
    out: dict[str, Any] = {"data": data}
    for key, value in (("event", event), ("tenant", tenant), ("users", users), ("retain", retain)):
        if value is not None:
            out[key] = value
    out.update(extra)
    return out


async def eventually(
    probe: Callable[[], Awaitable[T]],
    predicate: Callable[[T], bool] = bool,
    *,
    timeout: float = 5.0,
    interval: float = 0.02,
) -> T:
    """Poll ``await probe()`` until ``predicate(value)``; return that value.

    For state that cannot be awaited (metrics, /readyz). Raises ``TimeoutError``
    naming the last value seen.
    """
    last: Any = "<never probed>"
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await probe()
                if predicate(last):
                    return last
                await asyncio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"condition not met within {timeout}s; last value {last!r}") from None


async def fence(
    redis: aioredis.Redis,
    channel: str,
    *streams: SSEStream,
    payload: Callable[[str], Any] = lambda marker: {"data": marker},
    prefix: str = "sse:",
    timeout: float = 5.0,
) -> list[list[SSEEvent]]:
    """Prove an absence without a sleep: publish a unique marker on ``channel`` (which
    every one of ``streams`` subscribes to) and read each stream up to it.

    Returns, per stream, the events that came before the marker (already queued or
    read on the way), the marker itself left out. A stream gets its events in the
    order they were published to the broker (one ingest, one queue per stream), so
    once the marker is in, anything published before it and meant for that stream
    (a duplicate, a leak, a refused post) is in too: an empty list proves it never
    came. ``payload(marker)`` is what is published (a native envelope by default);
    the marker is found in the event's data.
    """
    marker = f"fence-{uuid.uuid4().hex}"
    receivers = await publish(redis, channel, payload(marker), prefix=prefix)
    assert receivers, f"nobody subscribed to {prefix}{channel}: the fence would never come"
    return await _read_to_marker(marker, streams, timeout)


async def fence_stream(
    redis: aioredis.Redis,
    channel: str,
    *streams: SSEStream,
    fields: Callable[[str], Mapping[str, str]] = lambda marker: {"data": marker},
    stream_key: str = "sse:stream",
    timeout: float = 5.0,
) -> list[list[SSEEvent]]:
    """:func:`fence` for a broker in ``ingest.mode = "stream"``: the marker is an entry
    ``XADD <stream_key> * channel <channel> <fields(marker)>`` (no trimming), read in
    stream order after every entry added before it.

    The marker stays in the stream (and the broker's history) like any entry: a later
    resume or ``XRANGE`` sees it. After the fence, a stream's ``parser.last_event_id``
    is the marker's id (nothing came after it). XADD cannot tell whether anybody reads
    the stream; a marker nobody delivers times out after ``timeout``.
    """
    marker = f"fence-{uuid.uuid4().hex}"
    await redis.xadd(stream_key, {"channel": channel, **fields(marker)})
    return await _read_to_marker(marker, streams, timeout)


async def _read_to_marker(
    marker: str, streams: tuple[SSEStream, ...], timeout: float
) -> list[list[SSEEvent]]:
    """Per stream, the events before the one whose data holds ``marker`` (consumed)."""
    before: list[list[SSEEvent]] = []
    for s in streams:
        got: list[SSEEvent] = []
        while marker not in (event := await s.next_event(timeout)).data:
            got.append(event)
        before.append(got)
    return before


# -- Prometheus text exposition ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    value: float = math.nan


_SAMPLE_LINE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r"\s+(?P<value>\S+)(?:\s+-?\d+)?\s*$"
)
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_UNESCAPE = re.compile(r"\\(.)")


def _unescape(value: str) -> str:
    return _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (``# HELP``/``# TYPE`` skipped)."""
    samples: list[Sample] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _SAMPLE_LINE.match(line)
        if match is None:
            raise ValueError(f"line {number} is not a sample: {line!r}")
        labels: dict[str, str] = {}
        body = match.group("labels") or ""
        pos = 0
        while pos < len(body.rstrip()):
            label = _LABEL.match(body, pos)
            if label is None:
                raise ValueError(f"line {number}: bad labels {body!r}")
            labels[label.group(1)] = _unescape(label.group(2))
            pos = label.end()
        samples.append(Sample(match.group("name"), labels, float(match.group("value"))))
    return samples


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """The value of sample ``name`` whose labels include ``labels``.

    When several samples match (e.g. no labels given for a counter with a
    ``reason`` label) their sum is returned, like PromQL ``sum()``. ``None``
    when no sample matches.
    """
    wanted = dict(labels or {})
    matches = [
        s.value
        for s in parse_metrics(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in wanted.items())
    ]
    return sum(matches) if matches else None


# -- HTTP against a broker -------------------------------------------------------------


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    """(status, JSON body — raw bytes if not JSON, None for a 200 stream — and headers)
    of a plain GET; the URL is sent as given (already encoded)."""
    async with http.get(
        URL(url, encoded=True), headers=headers, timeout=aiohttp.ClientTimeout(total=15)
    ) as resp:
        if resp.status == 200 and resp.content_type == "text/event-stream":
            return 200, None, resp.headers
        body = await resp.read()
        try:
            return resp.status, orjson.loads(body), resp.headers
        except orjson.JSONDecodeError:
            return resp.status, body, resp.headers


@contextlib.asynccontextmanager
async def stream(
    broker: Any,
    *channels: str,
    headers: dict[str, str] | None = None,
    last_event_id: str | None = None,
    **params: str,
) -> AsyncIterator[SSEStream]:
    """A 200 stream of ``broker`` (a conftest ``BrokerProcess``), returned once its
    preamble arrived: from then on it is registered and misses nothing. A fresh
    stream is also past its ``id: <head>`` block then (same write)."""
    url = broker.events_url(*channels, **params)
    async with SSEClient.connect(url, headers=headers, last_event_id=last_event_id) as s:
        assert s.status == 200, await s.text()
        await s.wait_for(
            lambda st: (
                "ok" in st.parser.comments
                and (last_event_id is not None or st.parser.last_event_id != "")
            ),
            what="the preamble",
        )
        yield s


@contextlib.asynccontextmanager
async def serve(app: aiohttp.web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port (a stand-in app, a page, a proxy) and
    yield its base URL; stopped on exit."""
    runner = aiohttp.web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
