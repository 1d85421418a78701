"""The baseline: a hand-rolled aiohttp + uvloop SSE broker, the way it is usually written.

Not part of the product. ``run.py`` measures the real broker against it.

Two shapes, both with an ``asyncio.Queue`` and a task per client and an
``await resp.write()`` per event:

- ``per-client`` (default): every client gets its own redis-py ``PubSub``
  (so its own Redis connection); Redis does the fan-out and each client
  decodes its own copy of every message.
- ``shared``: one ``PubSub`` pattern subscription for the process; a
  dispatcher task decodes each message once and puts the frame into the
  queue of every client of that channel.

Same surface as the broker as far as the bench needs: ``GET /events?channel=X``
(chunked ``text/event-stream``, preamble ``retry: 3000\\n: ok\\n\\n``, frames
``id: <n>\\ndata: <payload>\\n\\n``), ``/readyz`` (200 once Redis answers) and
``/metrics`` (``naive_events_ingested_total``: messages read from Redis).

Usage::

    python tests/bench/naive.py serve --listen 127.0.0.1:8080 --redis redis://127.0.0.1:6379/0
    python tests/bench/naive.py read --redis URL --channel sse:flood --count 100000

``read`` is the per-client shape's ingest path alone (``PubSub.listen()``,
decode, encode one frame) counting messages until ``--count``; it prints one
JSON line with the rate. The per-client server has no meaningful global
ingest counter (Redis filters per client), so the bench uses this instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import sys
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
import uvloop
from aiohttp import web

PREFIX = "sse:"
PREAMBLE = b"retry: 3000\n: ok\n\n"
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}

_ids = itertools.count(1)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def encode_frame(message: bytes) -> bytes:
    """Native envelope -> SSE frame: ``data`` verbatim when a string, else compact JSON."""
    try:
        envelope = orjson.loads(message)
    except orjson.JSONDecodeError:
        envelope = None
    if isinstance(envelope, dict) and "data" in envelope:
        data = envelope["data"]
        text = data if isinstance(data, str) else orjson.dumps(data).decode()
    else:
        text = message.decode("utf-8", "replace")
    lines = "".join(f"data: {line}\n" for line in text.splitlines() or [""])
    return f"id: {next(_ids)}\n{lines}\n".encode()


class State:
    def __init__(self, redis: aioredis.Redis, mode: str) -> None:
        self.redis = redis
        self.mode = mode
        self.ingested = 0
        self.ready = False
        # shared mode: channel -> queues of its clients
        self.queues: dict[str, set[asyncio.Queue[bytes]]] = {}


STATE = web.AppKey("state", State)


async def events(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    channel = request.query.get("channel")
    if not channel:
        return web.json_response({"error": "no_channel"}, status=400)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    pubsub = None
    reader: asyncio.Task[None] | None = None
    if state.mode == "per-client":
        pubsub = state.redis.pubsub()
        await pubsub.subscribe(PREFIX + channel)
        reader = asyncio.create_task(read_own(state, pubsub, queue))
    else:
        state.queues.setdefault(channel, set()).add(queue)
    resp = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    try:
        await resp.prepare(request)
        await resp.write(PREAMBLE)
        while True:
            frame = await queue.get()
            await resp.write(frame)
    finally:
        if reader is not None:
            reader.cancel()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        subs = state.queues.get(channel)
        if subs is not None:
            subs.discard(queue)
            if not subs:
                del state.queues[channel]


async def read_own(
    state: State, pubsub: aioredis.client.PubSub, queue: asyncio.Queue[bytes]
) -> None:
    async for message in pubsub.listen():
        if message["type"] == "message":
            state.ingested += 1
            queue.put_nowait(encode_frame(message["data"]))


async def read_shared(state: State, pubsub: aioredis.client.PubSub) -> None:
    cut = len(PREFIX)
    async for message in pubsub.listen():
        if message["type"] != "pmessage":
            continue
        state.ingested += 1
        subs = state.queues.get(message["channel"][cut:].decode())
        if subs:
            frame = encode_frame(message["data"])
            for queue in subs:
                queue.put_nowait(frame)


async def readyz(request: web.Request) -> web.Response:
    ok = request.app[STATE].ready
    return web.json_response({"status": "ready" if ok else "starting"}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        text=f"naive_events_ingested_total {request.app[STATE].ingested}\n",
        content_type="text/plain",
    )


async def serve(listen: str, redis_url: str, mode: str) -> None:
    host, _, port = listen.rpartition(":")
    redis = aioredis.from_url(redis_url, max_connections=2**31)
    state = State(redis, mode)
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/events", events)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    # Same listen backlog as the broker, so connect storms compare handlers, not backlogs.
    await web.TCPSite(runner, host, int(port), backlog=4096).start()
    dispatcher = None
    await redis.ping()
    if mode == "shared":
        pubsub = redis.pubsub()
        await pubsub.psubscribe(PREFIX + "*")
        dispatcher = asyncio.create_task(read_shared(state, pubsub))
    state.ready = True
    try:
        await asyncio.Event().wait()
    finally:
        if dispatcher is not None:
            dispatcher.cancel()
        await runner.cleanup()
        await redis.aclose()


async def read(redis_url: str, channel: str, count: int, timeout: float) -> dict[str, Any]:
    """Subscribe, print ``subscribed``, then count ``count`` messages (or until timeout)."""
    redis = aioredis.from_url(redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    print("subscribed", flush=True)
    n = 0
    first = last = cpu_first = cpu_last = 0.0

    async def consume() -> None:
        nonlocal n, first, last, cpu_first, cpu_last
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            encode_frame(message["data"])
            n += 1
            if n == 1:
                first = time.monotonic()
                cpu_first = time.process_time()
            if n >= count:
                last = time.monotonic()
                cpu_last = time.process_time()
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(consume(), timeout)
    if n < count:
        last = time.monotonic()
        cpu_last = time.process_time()
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await redis.aclose()
    span = last - first
    return {
        "count": n,
        "seconds": span,
        "rate": (n - 1) / span if n > 1 and span > 0 else 0.0,
        "cpu_seconds": cpu_last - cpu_first,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--listen", required=True)
    p_serve.add_argument("--redis", required=True)
    p_serve.add_argument("--mode", choices=("per-client", "shared"), default="per-client")
    p_read = sub.add_parser("read")
    p_read.add_argument("--redis", required=True)
    p_read.add_argument("--channel", required=True)
    p_read.add_argument("--count", type=int, required=True)
    p_read.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    raise_nofile()
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(serve(args.listen, args.redis, args.mode))
    else:
        result = uvloop.run(read(args.redis, args.channel, args.count, args.timeout))
        sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
