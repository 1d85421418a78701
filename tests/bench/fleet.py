"""A fleet of bridge-mode brokers seen from outside (the ``handover`` scenario).

Browser-like clients that hop to a random live process whenever their stream
ends, reading with the WHATWG parser of ``tests/sse_client.py``; a publisher
of one global sequence over many channels; the leader gauge. The same logic
as ``tests/test_bridge.py`` (``Follower``, ``publish_load``), in the native
format, with latencies and pauses recorded. Every loop is bounded by a count
or a deadline, or runs until its task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import redis.asyncio as aioredis
from procs import BenchError, Deadline
from targets import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the WHATWG client

from sse_client import SSEClient, SSEStream, SSEStreamClosed

PREFIX = "sse:"  # ingest.prefix (default)
LEADER = "sse_broker_bridge_leader"
READ_TIMEOUT = 30.0  # silence after which a client reconnects (heartbeats come every 15 s)
POLL = 0.02  # leader polling interval, seconds


@dataclass
class Follower:
    """A browser-like client of the fleet: on every end of its stream it reconnects,
    with its last event id, to a live process picked at random."""

    fleet: list[Server]
    channels: tuple[str, ...]
    session: aiohttp.ClientSession
    seqs: list[int] = field(default_factory=list)
    latencies_us: list[int] = field(default_factory=list)
    resets: Counter[str] = field(default_factory=Counter)
    told: Counter[str] = field(default_factory=Counter)  # broker.reconnect reasons
    failures: Counter[str] = field(default_factory=Counter)  # connect attempts that failed
    connects: int = 0
    ends: int = 0  # streams that ended under it (closed, or silent too long)
    ended: set[str] = field(default_factory=set)  # channels whose end marker arrived
    last_id: str | None = None
    last_data: float | None = None  # monotonic time of the last data event
    longest_pause: float = 0.0
    live: asyncio.Event = field(default_factory=asyncio.Event)  # connected once
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def finished(self) -> bool:
        """Every channel's end marker arrived."""
        return self.ended >= set(self.channels)

    def start(self) -> Follower:
        self.task = asyncio.create_task(self._run())
        return self

    def url(self, server: Server) -> str:
        query = "&".join(f"channel={c}" for c in self.channels)
        return f"http://127.0.0.1:{server.port}/events?{query}"

    async def _run(self) -> None:
        while not self.done.is_set():
            alive = [b for b in self.fleet if b.alive()]
            if not alive:
                return
            try:
                async with SSEClient.connect(
                    self.url(random.choice(alive)),
                    last_event_id=self.last_id,
                    session=self.session,
                    timeout=5,
                ) as s:
                    if s.status != 200:
                        self.failures[f"status {s.status}"] += 1
                    else:
                        self.connects += 1
                        self.live.set()
                        await self._read(s)
                        self.last_id = s.parser.last_event_id or self.last_id
            except (OSError, TimeoutError, aiohttp.ClientError) as exc:
                self.failures[type(exc).__name__] += 1
            await asyncio.sleep(random.uniform(0.05, 0.2))

    async def _read(self, s: SSEStream) -> None:
        while not self.done.is_set():
            try:
                event = await s.next_event(timeout=READ_TIMEOUT)
            except (SSEStreamClosed, TimeoutError):
                self.ends += 1
                return
            self.last_id = event.last_event_id or self.last_id
            if event.type == "broker.reset":
                self.resets[str(event.json().get("reason"))] += 1
            elif event.type == "broker.reconnect":
                self.told[str(event.json().get("reason"))] += 1
                return
            elif event.data.startswith("end:"):
                self.ended.add(event.data[4:])
                if self.finished:
                    self.done.set()
            else:
                now = time.monotonic()
                seq, _, sent_ns = event.data.partition(":")
                self.seqs.append(int(seq))
                self.latencies_us.append((time.time_ns() - int(sent_ns)) // 1000)
                if self.last_data is not None:
                    self.longest_pause = max(self.longest_pause, now - self.last_data)
                self.last_data = now

    async def stop(self) -> None:
        self.done.set()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def tally(self, sent: dict[str, list[int]]) -> dict[str, int]:
        """Lost, duplicated and out-of-order events against what was published."""
        wanted = {n for c in self.channels for n in sent[c]}
        got = Counter(self.seqs)
        return {
            "lost": len(wanted - got.keys()),
            "duplicated": sum(c - 1 for c in got.values()),
            "out_of_order": sum(1 for a, b in itertools.pairwise(self.seqs) if b <= a),
            "unexpected": len(got.keys() - wanted),
        }


async def publish_load(
    client: aioredis.Redis, channels: list[str], rate: float, seconds: float, deadline: Deadline
) -> dict[str, list[int]]:
    """PUBLISH ``rate`` events/s round-robin over ``channels``, ``seq`` global from 1,
    a pipeline per burst. Returns the seqs Redis acknowledged, per channel."""
    sent: dict[str, list[int]] = {c: [] for c in channels}
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = round(rate * seconds)
    n = 0
    while n < total:
        deadline.check("handover publishing")
        delay = start + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        burst = min(total - n, max(1, int((loop.time() - start) * rate) - n + 1))
        pipe = client.pipeline(transaction=False)
        for seq in range(n + 1, n + burst + 1):
            channel = channels[seq % len(channels)]
            payload = orjson.dumps({"data": f"{seq}:{time.time_ns()}"})
            _ = pipe.publish(PREFIX + channel, payload)
        await pipe.execute()
        for seq in range(n + 1, n + burst + 1):
            sent[channels[seq % len(channels)]].append(seq)
        n += burst
    return sent


async def gauge(server: Server, name: str) -> float | None:
    """One sample of a broker's /metrics (None when it does not answer)."""
    try:
        metrics = await asyncio.to_thread(server.metrics, 1.0)
    except (OSError, BenchError):
        return None
    return metrics.get(name)


async def leaders(fleet: list[Server]) -> list[Server]:
    values = await asyncio.gather(*(gauge(b, LEADER) for b in fleet))
    return [b for b, v in zip(fleet, values, strict=True) if v == 1]


async def wait_leader(fleet: list[Server], seconds: float) -> list[Server]:
    """Poll every :data:`POLL` s until exactly one of ``fleet`` leads (or ``seconds`` pass)."""
    until = time.monotonic() + seconds
    held = await leaders(fleet)
    while len(held) != 1 and time.monotonic() < until:
        await asyncio.sleep(POLL)
        held = await leaders(fleet)
    return held
