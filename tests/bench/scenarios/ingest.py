"""(c) ``ingest``: how fast a server takes in a ``redis-benchmark`` PUBLISH flood."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from array import array

import orjson
import procs
import redis
from procs import BenchError, ClientPool
from report import Metric
from targets import NAIVE, Context, Server

from scenarios.base import Result, Scenario
from scenarios.measure import Periodic

METRICS: list[Metric] = [
    ("events_per_s", "ingested events/s", "higher"),
    ("cpu_us_per_event", "CPU us per ingested event", "lower"),
    ("redis_publish_per_s", "redis-benchmark PUBLISH/s", ""),
    ("lag_after_publish_ms", "ingest lag when publishing ended ms", ""),
    ("readyz_worst_ms", "worst /readyz during flood ms", "lower"),
    ("ingested", "events counted", ""),
]

# Printed under the broker / naive table when the naive figure is the reader's.
READER_NOTE = (
    "ingest/naive is a standalone redis-py PubSub.listen() reader doing the naive "
    "server's per-message work (decode + frame), not a server counter"
)


def flood_cmd(ctx: Context, count: int) -> list[str]:
    return [
        "redis-benchmark",
        "-h", "127.0.0.1", "-p", str(ctx.redis.port),
        "-c", "4", "-P", "64", "-n", str(count), "--csv",
        "PUBLISH", "sse:flood", '{"data":1}',
    ]  # fmt: skip


def parse_benchmark(out: bytes) -> float | None:
    for line in out.decode(errors="replace").splitlines():
        if line.startswith('"PUBLISH'):
            return float(line.rsplit('","', 7)[1].strip('"'))
    return None


def run_flood(ctx: Context, count: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(flood_cmd(ctx, count), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.STARTED.append(proc)
    return proc


def finish_flood(ctx: Context, proc: subprocess.Popen[bytes]) -> float | None:
    try:
        out, _ = proc.communicate(timeout=ctx.deadline.left(60))
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        return None
    procs.STARTED.remove(proc)
    return parse_benchmark(out)


class Prober(Periodic):
    """Times ``GET url`` every 100 ms in the background (how responsive the loop stays)."""

    def __init__(self, url: str) -> None:
        super().__init__(0.1)
        self.url = url
        self.worst = 0.0

    def tick(self) -> None:
        t = time.monotonic()
        with contextlib.suppress(OSError):
            procs.http_get(self.url, timeout=10)
        self.worst = max(self.worst, time.monotonic() - t)


def ingest_by_markers(ctx: Context, server: Server, pool: ClientPool, count: int) -> Result:
    """Rate of the server's own ingest, timed by two marker events around the flood.

    The subscriber of channel ``other`` gets a marker published just before the
    flood and one just after it; a server handles its Redis messages in order,
    so the second marker arrives once the whole flood is ingested. The
    server's ingest counter confirms the count. (Polling ``/metrics`` instead
    does not work: the admin listener hardly answers while the loop ingests.)
    """
    publisher = redis.Redis(port=ctx.redis.port, socket_timeout=10)
    prober = Prober(server.ready_url)
    try:
        pool.expect(2)
        c0 = server.ingested()
        cpu0 = procs.cpu_seconds(server.pid)
        sent = [time.time_ns()]
        publisher.publish("sse:other", orjson.dumps({"data": f"1:{sent[0]}"}))
        prober.start()
        flood = run_flood(ctx, count)
        publish_rate = finish_flood(ctx, flood)
        sent.append(time.time_ns())
        publisher.publish("sse:other", orjson.dumps({"data": f"2:{sent[1]}"}))
        (got,) = pool.collect(ctx.deadline.left(60))
        prober.stop.set()
        cpu1 = procs.cpu_seconds(server.pid)
        ingested = server.ingested() - c0 - 2
        lat = array("q")
        lat.frombytes(got["latencies_us"])
    finally:
        prober.stop.set()
        publisher.close()
    if len(lat) < 2:
        raise BenchError(f"{server.kind}: the end marker did not arrive; ingested {ingested}")
    span = (sent[1] + lat[1] * 1000 - sent[0] - lat[0] * 1000) / 1e9
    return {
        "ingested": ingested,
        "seconds": span,
        "events_per_s": ingested / span if span > 0 else None,
        "redis_publish_per_s": publish_rate,
        "lag_after_publish_ms": lat[1] / 1000,
        "cpu_us_per_event": (cpu1 - cpu0) * 1e6 / ingested if ingested else None,
        "readyz_worst_ms": prober.worst * 1000,
        "source": 0.0,  # 0: the server itself
    }


def ingest_by_reader(ctx: Context, count: int) -> Result:
    """The naive per-client shape's ingest path alone (``naive.py read``), in its own process."""
    timeout = ctx.deadline.left(90)
    cmd = [sys.executable, str(NAIVE), "read", "--redis", ctx.redis.url, "--channel"]
    cmd += ["sse:flood", "--count", str(count), "--timeout", f"{timeout:.0f}"]
    reader = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    procs.STARTED.append(reader)
    try:
        assert reader.stdout is not None
        line = reader.stdout.readline()  # "subscribed"; bounded by the reader's own timeout
        if line.strip() != b"subscribed":
            raise BenchError(f"naive reader did not subscribe: {line!r}")
        flood = run_flood(ctx, count)
        out, _ = reader.communicate(timeout=timeout + 10)
        publish_rate = finish_flood(ctx, flood)
    finally:
        procs.stop(reader)
    result = orjson.loads(out.strip().splitlines()[-1])
    return {
        "ingested": result["count"],
        "seconds": result["seconds"],
        "events_per_s": result["rate"],
        "redis_publish_per_s": publish_rate,
        "cpu_us_per_event": result["cpu_seconds"] * 1e6 / result["count"]
        if result["count"]
        else None,
        "source": 1.0,  # 1: standalone redis-py reader
    }


def ingest(ctx: Context, kind: str) -> Result:
    s = ctx.settings
    with ctx.started(kind, "ingest") as run:
        # One subscriber on another channel: the server is live, nothing fans out.
        pool = run.clients(1)
        pool.connect(1, "other", concurrency=1, timeout=ctx.deadline.left(10), track=True)
        if kind == "naive" and ctx.naive_mode == "per-client":
            return ingest_by_reader(ctx, s.flood_count)
        return ingest_by_markers(ctx, run.server, pool, s.flood_count)


SCENARIO = Scenario("ingest", ingest, METRICS)
