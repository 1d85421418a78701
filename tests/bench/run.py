"""Hot-path benchmark: the broker against a naive aiohttp broker, same machine, same run.

    python tests/bench/run.py [--quick] [--only idle,fanout,ingest,soak,drain,stalled,workers]
                              [--json out.json]
    python tests/bench/run.py --only hostile   # 10,000 hostile requests (not in the default run)

Starts its own redis-server, then for each scenario starts a fresh server
(the real broker, then the naive baseline from ``naive.py``), loads it with
the lean client of ``loadclient.py`` and prints one table of
broker / naive ratios. The lifecycle scenarios (``soak``, ``drain``,
``stalled``) and ``workers`` (the fan-out against ``server.workers`` 1 and 2)
run the broker alone and print their own tables. The machine is
shared and noisy: compare ratios from one run, not absolute numbers across
runs. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import hostile
import loadclient
import orjson
import procs
import redis
from loadclient import raise_nofile
from procs import BenchError, ClientPool, Deadline, RedisServer, Server

SERVERS = ("broker", "naive")
COMPARED = ("idle", "fanout", "ingest")  # broker against the naive baseline
LIFECYCLE = ("soak", "drain", "stalled")  # the broker alone
EXTRA = ("workers",)  # the broker alone, server.workers = 1 against 2
HOSTILE = ("hostile",)  # the broker alone, generated hostile requests; only with --only
BROKER_ONLY = LIFECYCLE + EXTRA + HOSTILE
SCENARIOS = COMPARED + LIFECYCLE + EXTRA + HOSTILE
DEFAULT = COMPARED + LIFECYCLE + EXTRA  # workers adds ~40 s full, ~25 s quick


@dataclass(frozen=True)
class Settings:
    idle_conns: int
    fanout_subs: int
    fanout_rate: float
    fanout_seconds: float
    drain_seconds: float
    flood_count: int
    cap_seconds: float  # idle + fanout + ingest, both servers
    # soak: resuming streams through recycles
    soak_conns: int
    soak_cap: float
    # drain: SIGTERM with open streams
    drain_conns: int
    drain_cap: float
    # stalled: fast subscribers beside clients that never read
    stalled_seconds: float
    stalled_cap: float
    # workers: the fan-out against server.workers = 1, then 2
    workers_subs: int
    workers_seconds: float
    workers_cap: float
    workers_rate: float = 50
    soak_age_seconds: int = 10  # sse.max_connection_age_seconds
    soak_generations: int = 5
    # Events/s on the channel meanwhile: 20k deliveries/s in both sizes (the
    # quick 1,000 x 20/s). 5,000 x 20/s = 100k deliveries/s saturates two
    # shared cores by itself (README, "soak").
    soak_rate: float = 4
    soak_retry_ms: int = 500  # sse.retry_ms: the jittered wait before each reconnect
    drain_window_seconds: int = 5  # shutdown.drain_seconds
    stalled_fast: int = 200
    stalled_slow: int = 100
    stalled_rate: float = 50
    stalled_event_bytes: int = 8192
    connect_concurrency: int = 500  # in flight per client process
    # hostile: generated requests (tests/test_hostile_requests.py), after the classic attacks
    hostile_requests: int = 10_000
    hostile_cap: float = 300
    settle_seconds: float = 2.0

    def cap_for(self, scenarios: Sequence[str]) -> float:
        """The hard time cap of a run of ``scenarios``."""
        caps = {
            "soak": self.soak_cap,
            "drain": self.drain_cap,
            "stalled": self.stalled_cap,
            "workers": self.workers_cap,
            "hostile": self.hostile_cap,
        }
        compared = self.cap_seconds if any(x in COMPARED for x in scenarios) else 0.0
        return compared + sum(caps.get(x, 0.0) for x in scenarios)

    @classmethod
    def pick(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                idle_conns=1000,
                fanout_subs=300,
                fanout_rate=50,
                fanout_seconds=5,
                drain_seconds=8,
                flood_count=200_000,
                cap_seconds=90,
                soak_conns=1000,
                soak_rate=20,
                soak_cap=120,
                drain_conns=1000,
                drain_cap=60,
                stalled_seconds=8,
                stalled_cap=90,
                workers_subs=1000,
                workers_seconds=8,
                workers_cap=90,
                hostile_requests=2_000,
                hostile_cap=120,
            )
        return cls(
            idle_conns=5000,
            fanout_subs=1000,
            fanout_rate=50,
            fanout_seconds=20,
            drain_seconds=20,
            flood_count=1_000_000,
            cap_seconds=360,
            soak_conns=5000,
            soak_cap=180,
            drain_conns=5000,
            drain_cap=90,
            stalled_seconds=20,
            stalled_cap=150,
            workers_subs=2000,
            workers_seconds=15,
            workers_cap=150,
        )


@dataclass
class Row:
    scenario: str
    metric: str
    better: str  # "lower" | "higher" | "" (informational)
    values: dict[str, float | None]


@dataclass
class Context:
    settings: Settings
    redis: RedisServer
    tmp: Path
    deadline: Deadline
    naive_mode: str

    def server(self, kind: str, tag: str, settings: Sequence[str] = ()) -> Server:
        s = self.settings
        max_conn = 1000 + max(
            s.idle_conns,
            s.fanout_subs,
            s.soak_conns,
            s.drain_conns,
            s.stalled_fast + s.stalled_slow,
            s.workers_subs,
        )
        return procs.start_server(
            kind, self.redis.url, self.tmp, tag, self.deadline, self.naive_mode, max_conn, settings
        )

    def clients(self, n: int, server: Server) -> ClientPool:
        return ClientPool(2 if n >= 500 else 1, "127.0.0.1", server.port)


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[idx])


# -- (a) idle memory and connect time ---------------------------------------------------


def idle(ctx: Context, kind: str) -> dict[str, float | None]:
    s = ctx.settings
    server = ctx.server(kind, "idle")
    pool = None
    try:
        time.sleep(1.0)
        rss0 = procs.rss_kib(server.pid)
        cpu0 = procs.cpu_seconds(server.pid)
        pool = ctx.clients(s.idle_conns, server)
        results = pool.connect(
            s.idle_conns,
            "idle",
            concurrency=s.connect_concurrency,
            timeout=ctx.deadline.left(60),
            track=False,
        )
        cpu1 = procs.cpu_seconds(server.pid)
        ok = sum(r["ok"] for r in results)
        failed = sum(r["failed"] for r in results)
        errors = [r["errors"] for r in results if r["errors"]]
        if not ok:
            raise BenchError(f"no stream connected: {errors}")
        if failed:
            print(f"  {kind}: {failed} connections failed: {errors}", file=sys.stderr)
        elapsed = max(r["finished"] for r in results) - min(r["started"] for r in results)
        time.sleep(s.settle_seconds)
        rss1 = procs.rss_kib(server.pid)
        if not server.alive():
            raise BenchError(f"{kind} died during the idle scenario; see {server.log}")
        return {
            "connected": ok,
            "failed": failed,
            "connect_seconds": elapsed,
            "connects_per_s": ok / elapsed if elapsed > 0 else None,
            "kib_per_conn": (rss1 - rss0) / ok if ok else None,
            "rss_before_mib": rss0 / 1024,
            "rss_after_mib": rss1 / 1024,
            "cpu_us_per_connect": (cpu1 - cpu0) * 1e6 / ok if ok else None,
        }
    finally:
        if pool is not None:
            pool.close()
        server.stop()


# -- (b) fan-out latency -------------------------------------------------------------------


def latency_summary(collected: list[dict[str, Any]], count: int) -> dict[str, float | None]:
    """Percentiles over all deliveries, and per event: first receiver and first-to-last spread."""
    lat: list[int] = []
    first = [2**62] * (count + 1)
    last = [-(2**62)] * (count + 1)
    for r in collected:
        arr, seqs = array("q"), array("q")
        arr.frombytes(r["latencies_us"])
        seqs.frombytes(r["seqs"])
        lat.extend(arr)
        for seq, us in zip(seqs, arr, strict=True):
            if 0 < seq <= count:
                first[seq] = min(first[seq], us)
                last[seq] = max(last[seq], us)
    lat.sort()
    seen = [i for i in range(1, count + 1) if last[i] >= first[i]]
    firsts = sorted(first[i] for i in seen)
    spreads = sorted(last[i] - first[i] for i in seen)
    return {
        "p50_ms": percentile(lat, 0.50) / 1000,
        "p99_ms": percentile(lat, 0.99) / 1000,
        "max_ms": lat[-1] / 1000 if lat else None,
        "first_p50_ms": percentile(firsts, 0.50) / 1000,
        "first_p99_ms": percentile(firsts, 0.99) / 1000,
        "spread_p50_ms": percentile(spreads, 0.50) / 1000,
        "spread_p99_ms": percentile(spreads, 0.99) / 1000,
    }


def fanout_measure(
    ctx: Context,
    server: Server,
    pool: ClientPool,
    subs_wanted: int,
    rate: float,
    seconds: float,
    drain_seconds: float,
    pids: Sequence[int] | None = None,
) -> dict[str, float | None]:
    """Open ``subs_wanted`` tracked streams on ``fan``, publish ``rate``/s for ``seconds``,
    collect. Server CPU is summed over ``pids`` (default: the server process)."""
    pids = list(pids) if pids else [server.pid]
    kind = server.kind
    results = pool.connect(
        subs_wanted,
        "fan",
        concurrency=ctx.settings.connect_concurrency,
        timeout=ctx.deadline.left(60),
        track=True,
    )
    subs = sum(r["ok"] for r in results)
    if subs < subs_wanted:
        errors = [r["errors"] for r in results if r["errors"]]
        why = f"only {subs}/{subs_wanted} subscribers connected: {errors}"
        if not subs:
            raise BenchError(why)
        print(f"  {kind}: {why}", file=sys.stderr)
    count = round(rate * seconds)
    pool.expect(count)
    time.sleep(0.5)
    publisher = redis.Redis(port=ctx.redis.port, socket_timeout=10)
    try:
        cpu0 = sum(procs.cpu_seconds(p) for p in pids)
        first_ns = time.time_ns()
        t0 = time.monotonic()
        for i in range(count):
            ctx.deadline.check("fan-out publishing")
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            payload = orjson.dumps({"data": f"{i + 1}:{time.time_ns()}"})
            publisher.publish("sse:fan", payload)
        publish_seconds = time.monotonic() - t0
    finally:
        publisher.close()
    collected = pool.collect(ctx.deadline.left(drain_seconds))
    cpu1 = sum(procs.cpu_seconds(p) for p in pids)
    wall = time.monotonic() - t0
    latency = latency_summary(collected, count)
    received = sum(r["received_total"] for r in collected)
    last_ns = max(r["last_receive_ns"] for r in collected)
    span = (last_ns - first_ns) / 1e9 if last_ns else 0.0
    expected = subs * count
    client_cpu = sum(r["cpu_seconds"] for r in collected)
    return {
        "subscribers": subs,
        "events_published": count,
        "publish_seconds": publish_seconds,
        **latency,
        "delivered_per_s": received / span if span > 0 else None,
        "target_per_s": subs * rate,
        "expected": expected,
        "received": received,
        "missing_after_drain": sum(r["missing_total"] for r in collected),
        "gaps": sum(r["gaps_total"] for r in collected),
        "out_of_order": sum(r["disorder_total"] for r in collected),
        "streams_dropped": sum(r["dropped"] for r in collected),
        "incomplete_streams": subs - sum(r["complete_streams"] for r in collected),
        "cpu_seconds": cpu1 - cpu0,
        "cpu_pct": (cpu1 - cpu0) * 100 / wall if wall > 0 else None,
        "cpu_us_per_delivery": (cpu1 - cpu0) * 1e6 / received if received else None,
        "client_cpu_us_per_delivery": client_cpu * 1e6 / received if received else None,
    }


def fanout(ctx: Context, kind: str) -> dict[str, float | None]:
    s = ctx.settings
    server = ctx.server(kind, "fanout")
    pool = None
    try:
        pool = ctx.clients(s.fanout_subs, server)
        return fanout_measure(
            ctx, server, pool, s.fanout_subs, s.fanout_rate, s.fanout_seconds, s.drain_seconds
        )
    finally:
        if pool is not None:
            pool.close()
        server.stop()


# -- (g) workers: the same fan-out, server.workers = 1 then 2 -------------------------------


class TreeRss(threading.Thread):
    """Every 200 ms: the summed RSS of a process and its descendants; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for p in procs.tree(self.pid):
                with contextlib.suppress(OSError, BenchError):
                    total += procs.rss_kib(p)
            self.peak_kib = max(self.peak_kib, total)
            self.stop.wait(0.2)


def workers_run(ctx: Context, n: int) -> dict[str, Any]:
    """One fan-out run against ``server.workers = n`` (n = 1: the plain single process)."""
    s = ctx.settings
    server = ctx.server("broker", f"workers{n}", (f"server.workers={n}",))
    pool = None
    sampler = TreeRss(server.pid)
    try:
        pids = procs.tree(server.pid)
        workers = [p for p in pids if p != server.pid] if n > 1 else [server.pid]
        if len(workers) != n:
            raise BenchError(f"workers={n}: found {len(workers)} worker processes ({pids})")
        sampler.start()
        pool = ctx.clients(s.workers_subs, server)
        result: dict[str, Any] = dict(
            fanout_measure(
                ctx,
                server,
                pool,
                s.workers_subs,
                s.workers_rate,
                s.workers_seconds,
                s.drain_seconds,
                pids,
            )
        )
        # Streams still open (the clients have not closed yet): per worker, and summed.
        per_worker = []
        for pid in workers:
            path = procs.worker_admin_path(pid) if n > 1 else None
            m = procs.unix_metrics(path) if path else server.metrics()
            per_worker.append(int(m.get("sse_broker_connections", -1)))
        result["streams_per_worker"] = per_worker
        result["streams_metric"] = server.metric("sse_broker_connections")
        result["processes"] = len(pids)
        result["rss_end_kib"] = sum(procs.rss_kib(p) for p in pids)
        sampler.stop.set()
        sampler.join(1)
        result["rss_peak_kib"] = sampler.peak_kib
        result["log_problems"] = log_problems(server.log)
        if not server.alive() or sorted(procs.tree(server.pid)) != sorted(pids):
            raise BenchError(f"workers={n}: a process died or restarted; see {server.log}")
        return result
    finally:
        sampler.stop.set()
        if pool is not None:
            pool.close()
        server.stop()


def workers(ctx: Context, kind: str) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for n in (1, 2):
        print(f"  server.workers={n} ...", file=sys.stderr, flush=True)
        try:
            runs[str(n)] = workers_run(ctx, n)
        except (BenchError, OSError, redis.RedisError) as exc:
            runs[str(n)] = {"error": str(exc)}
            print(f"  failed: {exc}", file=sys.stderr)
    return runs


# -- (c) ingest rate ------------------------------------------------------------------


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


class Prober(threading.Thread):
    """Times ``GET url`` every 100 ms in the background (how responsive the loop stays)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.worst = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            with contextlib.suppress(OSError):
                procs.http_get(self.url, timeout=10)
            self.worst = max(self.worst, time.monotonic() - t)
            self.stop.wait(0.1)


def ingest_by_markers(
    ctx: Context, server: Server, pool: ClientPool, count: int
) -> dict[str, float | None]:
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


def ingest_by_reader(ctx: Context, count: int) -> dict[str, float | None]:
    """The naive per-client shape's ingest path alone (``naive.py read``), in its own process."""
    timeout = ctx.deadline.left(90)
    cmd = [sys.executable, str(procs.NAIVE), "read", "--redis", ctx.redis.url, "--channel"]
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


def ingest(ctx: Context, kind: str) -> dict[str, float | None]:
    s = ctx.settings
    server = ctx.server(kind, "ingest")
    pool = None
    try:
        # One subscriber on another channel: the server is live, nothing fans out.
        pool = ctx.clients(1, server)
        pool.connect(1, "other", concurrency=1, timeout=ctx.deadline.left(10), track=True)
        if kind == "naive" and ctx.naive_mode == "per-client":
            return ingest_by_reader(ctx, s.flood_count)
        return ingest_by_markers(ctx, server, pool, s.flood_count)
    finally:
        if pool is not None:
            pool.close()
        server.stop()


# -- lifecycle scenarios (broker only) ------------------------------------------------------


class Sampler(threading.Thread):
    """Every 100 ms: the server's RSS and, when ``metric`` is given, that sample of /metrics."""

    def __init__(self, server: Server, metric: str | None = None) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.metric = metric
        self.samples: list[tuple[float, int, float | None]] = []  # (monotonic, KiB, value)
        self.tcp_mem_kib: list[int] = []  # host-wide kernel TCP buffers
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            value = None
            with contextlib.suppress(OSError, BenchError):
                rss = procs.rss_kib(self.server.pid)
                if self.metric is not None:
                    value = self.server.metrics(1.0).get(self.metric)
                self.samples.append((time.monotonic(), rss, value))
                self.tcp_mem_kib.append(procs.tcp_sockstat().get("mem", 0))
            self.stop.wait(0.1)

    def peak_kib(self) -> int | None:
        return max((s[1] for s in self.samples), default=None)

    def first_reaching(self, value: float) -> float | None:
        """Monotonic time of the first sample whose metric value is >= ``value``."""
        return next((t for t, _, v in self.samples if v is not None and v >= value), None)


class Publisher(threading.Thread):
    """PUBLISH ``{"data": "<seq>:<time_ns>"}`` on ``channel`` at ``rate``/s until stopped."""

    def __init__(self, port: int, channel: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis(port=port, socket_timeout=10)
        self.channel = channel
        self.rate = rate
        self.published = 0
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            while not self.stop.is_set():
                delay = t0 + self.published / self.rate - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    break
                payload = orjson.dumps({"data": f"{self.published + 1}:{time.time_ns()}"})
                self.client.publish(self.channel, payload)
                self.published += 1
        except redis.RedisError as exc:
            self.error = exc
        finally:
            self.client.close()

    def finish(self) -> int:
        self.stop.set()
        self.join(15)
        if self.error is not None:
            raise BenchError(f"publisher failed: {self.error}")
        return self.published


def log_problems(path: Path) -> int:
    """ERROR/CRITICAL lines in a server log, and tracebacks no such line introduced."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return -1
    logged = sum(1 for line in lines if " ERROR " in line or " CRITICAL " in line)
    bare = sum(
        1
        for before, line in zip(["", *lines], lines, strict=False)
        if line.startswith("Traceback") and " ERROR " not in before
    )
    return logged + bare


def summed(statuses: list[dict[str, Any]], key: str, sub: str | None = None) -> int:
    if sub is None:
        return sum(int(st[key]) for st in statuses)
    return sum(int(st[key].get(sub, 0)) for st in statuses)


def soak(ctx: Context, kind: str) -> dict[str, Any]:
    """Memory through repeated recycles; resumes must lose and duplicate nothing."""
    s = ctx.settings
    n = s.soak_conns
    server = ctx.server(
        kind,
        "soak",
        (
            f"sse.max_connection_age_seconds={s.soak_age_seconds}",
            f"sse.retry_ms={s.soak_retry_ms}",
        ),
    )
    pool = None
    publisher = None
    sampler = Sampler(server)
    try:
        time.sleep(1.0)
        rss_base = procs.rss_kib(server.pid)
        pool = ctx.clients(n, server)
        t_start = time.monotonic()
        results = pool.resume(
            n,
            "soak",
            concurrency=s.connect_concurrency,
            timeout=ctx.deadline.left(60),
            reconnect=True,
            retry_ms=s.soak_retry_ms,
        )
        ok = sum(r["ok"] for r in results)
        if ok < n:
            errors = [r["errors"] for r in results if r["errors"]]
            if not ok:
                raise BenchError(f"no stream connected: {errors}")
            print(f"  soak: only {ok}/{n} streams connected: {errors}", file=sys.stderr)
        connect_seconds = time.monotonic() - t_start
        publisher = Publisher(ctx.redis.port, "sse:soak", s.soak_rate)
        publisher.start()
        sampler.start()
        cpu0 = procs.cpu_seconds(server.pid)
        wait0 = procs.runq_wait_seconds(server.pid)
        time.sleep(s.settle_seconds)

        generations: list[dict[str, Any]] = []

        def sample(gen: int, statuses: list[dict[str, Any]]) -> None:
            m = server.metrics()
            generations.append(
                {
                    "generation": gen,
                    "t_s": time.monotonic() - t_start,
                    "rss_kib": procs.rss_kib(server.pid),
                    "clients_open": summed(statuses, "open"),
                    "broker_connections": m.get("sse_broker_connections"),
                    "history_kib": (m.get("sse_broker_history_bytes") or 0) / 1024,
                    "recycles_total": summed(statuses, "reconnects", "recycle"),
                    "reopen_failures_total": summed(statuses, "reopen_failures"),
                    "resets_total": sum(sum(st["resets"].values()) for st in statuses),
                    "lost_total": summed(statuses, "lost"),
                    "duplicated_total": summed(statuses, "duplicated"),
                }
            )

        sample(0, pool.status())
        complete = True
        # One generation: age * 1.1 at most, the retry (<= 1.5 x retry_ms), and
        # slack for reconnects that wait (the client waits up to 60 s, like a browser).
        per_gen = s.soak_age_seconds * 1.1 + s.soak_retry_ms * 1.5 / 1000 + 45
        for gen in range(1, s.soak_generations + 1):
            until = time.monotonic() + ctx.deadline.left(per_gen)
            while True:
                statuses = pool.status()
                if min(st["min_generation"] for st in statuses) >= gen:
                    break
                if time.monotonic() > until:
                    complete = False
                    break
                time.sleep(0.2)
            sample(gen, statuses)
            if not complete:
                print(f"  soak: generation {gen} did not complete in time", file=sys.stderr)
                break
        published = publisher.finish()
        # Everyone (also those inside a retry gap) catches up on the last event.
        until = time.monotonic() + ctx.deadline.left(15)
        while time.monotonic() < until:
            if min(st["min_seq"] for st in pool.status()) >= published:
                break
            time.sleep(0.2)
        cpu1 = procs.cpu_seconds(server.pid)
        wait1 = procs.runq_wait_seconds(server.pid)
        soak_seconds = time.monotonic() - t_start
        final = pool.collect_resume()
        sampler.stop.set()
        problems = log_problems(server.log)
        pool.close()  # aborts reconnects still pending
        pool = None
        time.sleep(s.settle_seconds)
        rss_closed = procs.rss_kib(server.pid)
        if not server.alive():
            raise BenchError(f"broker died during the soak; see {server.log}")
        missing = 0
        for st in final:
            seqs = array("q")
            seqs.frombytes(st["last_seqs"])
            missing += sum(max(0, published - x) for x in seqs)
        reasons: Counter[str] = Counter()
        refusals: Counter[str] = Counter()
        for st in final:
            reasons.update(st["reconnects"])
            refusals.update(st["refusals"])
        reopen_ms: list[tuple[float, float]] = []  # (done, relative to t_start; ms)
        for st in final:
            us, done = array("q"), array("q")
            us.frombytes(st["reopen_us"])
            done.frombytes(st["reopen_done_ns"])
            reopen_ms.extend((d / 1e9 - t_start, u / 1000) for u, d in zip(us, done, strict=True))
        all_reopen = sorted(ms for _, ms in reopen_ms)
        prev = generations[0]
        for g in generations:
            window = sorted(ms for t, ms in reopen_ms if prev["t_s"] < t <= g["t_s"])
            g["reopen_p50_ms"] = percentile(window, 0.5) if window else None
            g["reopen_p99_ms"] = percentile(window, 0.99) if window else None
            g["reopen_max_ms"] = window[-1] if window else None
            g["rss_delta_kib"] = g["rss_kib"] - generations[0]["rss_kib"]
            g["recycles_in_window"] = g["recycles_total"] - prev["recycles_total"]
            g["reopen_failures_in_window"] = (
                g["reopen_failures_total"] - prev["reopen_failures_total"]
            )
            prev = g
        first, last = generations[0], generations[-1]
        gens_done = last["generation"] if complete else last["generation"] - 1
        gen1 = generations[min(1, len(generations) - 1)]
        later_recycles = last["recycles_total"] - gen1["recycles_total"]
        return {
            "streams": ok,
            "connect_seconds": connect_seconds,
            "generations_completed": gens_done,
            "rate": s.soak_rate,
            "published": published,
            "rss_baseline_kib": rss_base,
            "rss_connected_kib": first["rss_kib"],
            "kib_per_stream_at_connect": (first["rss_kib"] - rss_base) / ok,
            "rss_after_kib": last["rss_kib"],
            "rss_growth_kib": last["rss_kib"] - first["rss_kib"],
            "growth_bytes_per_stream": (last["rss_kib"] - first["rss_kib"]) * 1024 / ok,
            "growth_after_gen1_kib": last["rss_kib"] - gen1["rss_kib"],
            "history_growth_after_gen1_kib": last["history_kib"] - gen1["history_kib"],
            "growth_bytes_per_later_recycle": (
                last["rss_kib"] - gen1["rss_kib"] - (last["history_kib"] - gen1["history_kib"])
            )
            * 1024
            / later_recycles
            if later_recycles
            else None,
            "rss_peak_kib": sampler.peak_kib(),
            "rss_closed_kib": rss_closed,
            "history_kib_end": last["history_kib"],
            "recycles": reasons.get("recycle", 0),
            "other_reconnects": sum(reasons.values()) - reasons.get("recycle", 0),
            "refusals": sum(refusals.values()),
            "reopen_failures": summed(final, "reopen_failures"),
            "reopen_errors": [st["reopen_errors"] for st in final if st["reopen_errors"]],
            "unexpected_closes": summed(final, "unexpected_closes"),
            "reopen_p50_ms": percentile(all_reopen, 0.5) if all_reopen else None,
            "reopen_p99_ms": percentile(all_reopen, 0.99) if all_reopen else None,
            "reopen_max_ms": all_reopen[-1] if all_reopen else None,
            "resets": sum(sum(st["resets"].values()) for st in final),
            "lost": summed(final, "lost"),
            "duplicated": summed(final, "duplicated"),
            "missing_at_end": missing,
            "soak_seconds": soak_seconds,
            "server_cpu_pct": (cpu1 - cpu0) * 100 / max(1e-9, soak_seconds - connect_seconds),
            "server_runq_pct": (wait1 - wait0) * 100 / max(1e-9, soak_seconds - connect_seconds),
            "client_cpu_seconds": sum(st["cpu_seconds"] for st in final),
            "log_problems": problems,
            "loadavg_1m": os.getloadavg()[0],
            "log_problems_teardown": log_problems(server.log) - problems,
            "per_generation": generations,
        }
    finally:
        sampler.stop.set()
        if publisher is not None and publisher.is_alive():
            publisher.stop.set()
        if pool is not None:
            pool.close()
        server.stop()


def drain(ctx: Context, kind: str) -> dict[str, Any]:
    """SIGTERM with thousands of open streams: when does each get broker.reconnect (drain)?"""
    s = ctx.settings
    n = s.drain_conns
    window = s.drain_window_seconds
    server = ctx.server(kind, "drain", (f"shutdown.drain_seconds={window}",))
    pool = None
    try:
        pool = ctx.clients(n, server)
        results = pool.resume(
            n,
            "drain",
            concurrency=s.connect_concurrency,
            timeout=ctx.deadline.left(60),
            reconnect=False,  # they would come back on another instance
        )
        ok = sum(r["ok"] for r in results)
        if ok < n:
            errors = [r["errors"] for r in results if r["errors"]]
            if not ok:
                raise BenchError(f"no stream connected: {errors}")
            print(f"  drain: only {ok}/{n} streams connected: {errors}", file=sys.stderr)
        time.sleep(s.settle_seconds)
        open_before = server.metric("sse_broker_connections")
        not_ready_ns: list[int] = []

        def watch_ready() -> None:
            until = time.monotonic() + 5
            while time.monotonic() < until:
                try:
                    status = procs.http_get(server.ready_url, 1.0)[0]
                except OSError:
                    status = 0
                if status != 200:
                    not_ready_ns.append(time.monotonic_ns())
                    return
                time.sleep(0.01)

        wait0 = procs.runq_wait_seconds(server.pid)
        cpu0 = procs.cpu_seconds(server.pid)
        wait1 = cpu1 = None

        def last_reading() -> None:  # just before it exits (no /proc entry after)
            nonlocal wait1, cpu1
            with contextlib.suppress(OSError, ValueError, IndexError):
                while server.proc.poll() is None:
                    wait1 = procs.runq_wait_seconds(server.pid)
                    cpu1 = procs.cpu_seconds(server.pid)
                    time.sleep(0.05)

        reader = threading.Thread(target=last_reading, daemon=True)
        t0 = time.monotonic_ns()
        server.proc.send_signal(signal.SIGTERM)
        reader.start()
        watcher = threading.Thread(target=watch_ready, daemon=True)
        watcher.start()
        try:
            code = server.proc.wait(ctx.deadline.left(window + 30))
        except subprocess.TimeoutExpired:
            raise BenchError(f"broker still running {window + 30}s after SIGTERM") from None
        t_exit = time.monotonic_ns()
        watcher.join(5)
        reader.join(5)
        time.sleep(0.5)  # the clients read the last closes
        final = pool.collect_resume()
    finally:
        if pool is not None:
            pool.close()
        server.stop()
    arrivals: list[float] = []
    closes: list[float] = []
    other = 0
    for st in final:
        ev, why, cl = array("q"), array("b"), array("q")
        ev.frombytes(st["event_ns"])
        why.frombytes(st["event_reason"])
        cl.frombytes(st["close_ns"])
        for t, r in zip(ev, why, strict=True):
            if loadclient.REASONS[r] == "drain":
                arrivals.append((t - t0) / 1e6)
            else:
                other += 1
        closes.extend((t - t0) / 1e6 for t in cl)
    arrivals.sort()
    closes.sort()
    n_window = round(window * 10)
    buckets = [0] * max(n_window, int(arrivals[-1] // 100) + 1 if arrivals else 0)
    for ms in arrivals:
        buckets[max(0, int(ms // 100))] += 1
    in_window = buckets[:n_window]
    return {
        "streams": ok,
        "open_before": open_before,
        "drain_reconnects": len(arrivals),
        "other_reconnects": other,
        "closed_without_reconnect": summed(final, "unexpected_closes"),
        "not_closed": ok - len(closes),
        "first_ms": arrivals[0] if arrivals else None,
        "last_ms": arrivals[-1] if arrivals else None,
        "last_close_ms": closes[-1] if closes else None,
        "buckets_in_window": n_window,
        "nonempty_buckets": sum(1 for c in in_window if c),
        "bucket_min": min(in_window) if in_window else None,
        "bucket_max": max(in_window) if in_window else None,
        "bucket_mean": sum(in_window) / n_window if n_window else None,
        "bucket_even": ok / n_window if n_window else None,
        "after_window": sum(buckets[n_window:]),
        "exit_code": code,
        "drain_seconds": (t_exit - t0) / 1e9,
        "not_ready_ms": (not_ready_ns[0] - t0) / 1e6 if not_ready_ns else None,
        "server_cpu_pct": (cpu1 - cpu0) * 100e9 / (t_exit - t0) if cpu1 is not None else None,
        "server_runq_pct": (wait1 - wait0) * 100e9 / (t_exit - t0) if wait1 is not None else None,
        "log_problems": log_problems(server.log),
        "loadavg_1m": os.getloadavg()[0],
        "buckets": buckets,
    }


def p99_per_second(collected: list[dict[str, Any]], rate: float) -> list[float]:
    """p99 latency (ms) of the deliveries of the events published in each second."""
    per: dict[int, list[int]] = {}
    for r in collected:
        arr, seqs = array("q"), array("q")
        arr.frombytes(r["latencies_us"])
        seqs.frombytes(r["seqs"])
        for seq, us in zip(seqs, arr, strict=True):
            per.setdefault(int((seq - 1) // rate), []).append(us)
    return [percentile(sorted(per[k]), 0.99) / 1000 for k in sorted(per)]


def latency_upto(collected: list[dict[str, Any]], cut: int) -> dict[str, float | None]:
    """p50/p99/max of the deliveries of events 1..cut."""
    lat: list[int] = []
    for r in collected:
        arr, seqs = array("q"), array("q")
        arr.frombytes(r["latencies_us"])
        seqs.frombytes(r["seqs"])
        lat.extend(us for seq, us in zip(seqs, arr, strict=True) if seq <= cut)
    lat.sort()
    return {
        "cut_p50_ms": percentile(lat, 0.50) / 1000,
        "cut_p99_ms": percentile(lat, 0.99) / 1000,
        "cut_max_ms": lat[-1] / 1000 if lat else None,
    }


def stalled_run(
    ctx: Context, kind: str, n_stalled: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``stalled_fast`` tracked subscribers (+ ``n_stalled`` that never read) at
    ``stalled_rate`` events/s of ``stalled_event_bytes`` each."""
    s = ctx.settings
    server = ctx.server(kind, f"stalled-{n_stalled}")
    pool = None
    socks: list[socket.socket] = []
    publisher = redis.Redis(port=ctx.redis.port, socket_timeout=10)
    sampler = Sampler(server, "sse_broker_slow_consumer_closes_total")
    try:
        pool = ctx.clients(s.stalled_fast, server)
        results = pool.connect(
            s.stalled_fast,
            "stall",
            concurrency=s.connect_concurrency,
            timeout=ctx.deadline.left(60),
            track=True,
        )
        subs = sum(r["ok"] for r in results)
        if subs < s.stalled_fast:
            raise BenchError(f"only {subs}/{s.stalled_fast} fast subscribers connected")
        if n_stalled:
            request = (
                f"GET /events?channel=stall HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                "Accept: text/event-stream\r\n\r\n"
            ).encode()
            socks = procs.open_stalled(n_stalled, "127.0.0.1", server.port, request)
            until = time.monotonic() + ctx.deadline.left(20)
            while server.metric("sse_broker_connections") < subs + n_stalled:
                if time.monotonic() > until:
                    raise BenchError("the stalled clients were not all registered")
                time.sleep(0.05)
        count = round(s.stalled_rate * s.stalled_seconds)
        pool.expect(count)
        time.sleep(0.5)
        rss0 = procs.rss_kib(server.pid)
        cpu0 = procs.cpu_seconds(server.pid)
        wait0 = procs.runq_wait_seconds(server.pid)
        tcp0 = procs.tcp_sockstat()
        sampler.start()
        # Padding: trailing spaces, which the client's int() ignores.
        pad = " " * max(0, s.stalled_event_bytes - 30)
        first_ns = time.time_ns()
        t0 = time.monotonic()
        for i in range(count):
            ctx.deadline.check("stalled publishing")
            delay = t0 + i / s.stalled_rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            publisher.publish("sse:stall", orjson.dumps({"data": f"{i + 1}:{time.time_ns()}{pad}"}))
        publish_seconds = time.monotonic() - t0
        collected = pool.collect(ctx.deadline.left(s.drain_seconds))
        sampler.stop.set()
        sampler.join(2)
        cpu1 = procs.cpu_seconds(server.pid)
        wait1 = procs.runq_wait_seconds(server.pid)
        rss1 = procs.rss_kib(server.pid)
        tcp1 = procs.tcp_sockstat()
        m = server.metrics()
        closes = int(m.get("sse_broker_slow_consumer_closes_total") or 0)
        all_closed_at = sampler.first_reaching(n_stalled) if n_stalled else None
        received = sum(r["received_total"] for r in collected)
        last_ns = max(r["last_receive_ns"] for r in collected)
        span = (last_ns - first_ns) / 1e9 if last_ns else 0.0
        if not server.alive():
            raise BenchError(f"broker died in the stalled scenario; see {server.log}")
        result: dict[str, Any] = {
            "fast": subs,
            "stalled": n_stalled,
            "events": count,
            "event_bytes": len(orjson.dumps({"data": f"{count}:{time.time_ns()}{pad}"})),
            "publish_seconds": publish_seconds,
            **latency_summary(collected, count),
            "delivered_per_s": received / span if span > 0 else None,
            "received": received,
            "missing_after_drain": sum(r["missing_total"] for r in collected),
            "gaps": sum(r["gaps_total"] for r in collected),
            "out_of_order": sum(r["disorder_total"] for r in collected),
            "fast_dropped": sum(r["dropped"] for r in collected),
            "slow_closes": closes,
            "stalled_open_at_end": (m.get("sse_broker_connections") or 0) - subs,
            "all_stalled_closed_s": all_closed_at - t0 if all_closed_at is not None else None,
            "rss_before_kib": rss0,
            "rss_peak_kib": sampler.peak_kib(),
            "rss_end_kib": rss1,
            "tcp_mem_before_kib": tcp0.get("mem"),
            "tcp_mem_peak_kib": max(sampler.tcp_mem_kib, default=None),
            "tcp_mem_end_kib": tcp1.get("mem"),
            "tcp_orphans_end": tcp1.get("orphan"),
            "cpu_us_per_delivery": (cpu1 - cpu0) * 1e6 / received if received else None,
            "server_runq_pct": (wait1 - wait0) * 100 / max(1e-9, time.monotonic() - t0),
            "loadavg_1m": os.getloadavg()[0],
            "log_problems": log_problems(server.log),
            "p99_per_second_ms": p99_per_second(collected, s.stalled_rate),
            "closes_timeline": [
                (round(t - t0, 2), v) for t, _, v in sampler.samples if v is not None
            ],
        }
        return result, collected
    finally:
        sampler.stop.set()
        for sock in socks:
            sock.close()
        publisher.close()
        if pool is not None:
            pool.close()
        server.stop()


def stalled(ctx: Context, kind: str) -> dict[str, Any]:
    """Fast subscribers' latency alone, then beside ``stalled_slow`` clients that never read."""
    s = ctx.settings
    alone, alone_lat = stalled_run(ctx, kind, 0)
    beside, beside_lat = stalled_run(ctx, kind, s.stalled_slow)
    # Also compare over the events published while stalled clients were still
    # open (until the broker had closed them all), the same events in both runs.
    count = beside["events"]
    closed_s = beside["all_stalled_closed_s"]
    cut = count if closed_s is None else min(count, max(1, math.ceil(closed_s * s.stalled_rate)))
    alone.update(latency_upto(alone_lat, cut))
    beside.update(latency_upto(beside_lat, cut))
    alone["cut_events"] = beside["cut_events"] = cut
    return {"alone": alone, "with_stalled": beside}


# -- report -------------------------------------------------------------------------------

METRICS: dict[str, list[tuple[str, str, str]]] = {
    # scenario -> (key, label, better)
    "idle": [
        ("kib_per_conn", "RSS KiB per idle stream", "lower"),
        ("connect_seconds", "seconds to connect all + preamble", "lower"),
        ("connects_per_s", "connects/s", "higher"),
        ("cpu_us_per_connect", "server CPU us per connect", "lower"),
        ("connected", "streams connected", ""),
        ("failed", "connects failed", "lower"),
    ],
    "fanout": [
        ("p50_ms", "latency p50 ms", "lower"),
        ("p99_ms", "latency p99 ms", "lower"),
        ("max_ms", "latency max ms", "lower"),
        ("first_p50_ms", "first subscriber's latency p50 ms", "lower"),
        ("first_p99_ms", "first subscriber's latency p99 ms", "lower"),
        ("spread_p50_ms", "first-to-last spread p50 ms", "lower"),
        ("spread_p99_ms", "first-to-last spread p99 ms", "lower"),
        ("delivered_per_s", "delivered events/s", "higher"),
        ("target_per_s", "target deliveries/s", ""),
        ("cpu_us_per_delivery", "server CPU us per delivery", "lower"),
        ("client_cpu_us_per_delivery", "load-client CPU us per delivery", ""),
        ("missing_after_drain", "events missing after drain", "lower"),
        ("gaps", "gaps (lost mid-stream)", "lower"),
        ("out_of_order", "out of order / duplicate", "lower"),
        ("streams_dropped", "streams closed by server", "lower"),
    ],
    "ingest": [
        ("events_per_s", "ingested events/s", "higher"),
        ("cpu_us_per_event", "CPU us per ingested event", "lower"),
        ("redis_publish_per_s", "redis-benchmark PUBLISH/s", ""),
        ("lag_after_publish_ms", "ingest lag when publishing ended ms", ""),
        ("readyz_worst_ms", "worst /readyz during flood ms", "lower"),
        ("ingested", "events counted", ""),
    ],
}


def rows_for(scenario: str, results: dict[str, dict[str, float | None]]) -> list[Row]:
    return [
        Row(scenario, label, better, {kind: results.get(kind, {}).get(key) for kind in SERVERS})
        for key, label, better in METRICS[scenario]
    ]


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v != v:  # NaN
        return "nan"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if v else "0"


def ratio(row: Row) -> tuple[str, str]:
    b, n = row.values.get("broker"), row.values.get("naive")
    if b is None or n is None or not n or b != b or n != n:
        return "-", ""
    r = b / n
    if not row.better:
        return f"{r:.2f}", ""
    winner = "broker" if (r < 1) == (row.better == "lower") else "naive"
    return f"{r:.2f}", "" if abs(r - 1) < 0.05 else winner


def print_grid(header: tuple[str, ...], body: list[tuple[str, ...]], left: int = 2) -> None:
    """A plain-text table: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in body:
        print(line(r))


def print_table(rows: list[Row]) -> None:
    header = ("scenario", "metric", "broker", "naive", "ratio b/n", "better")
    body = [
        (r.scenario, r.metric, fmt(r.values["broker"]), fmt(r.values["naive"]), *ratio(r))
        for r in rows
    ]
    print_grid(header, body)


# -- lifecycle reports (broker only) --


def print_soak(r: dict[str, Any], s: Settings) -> None:
    n = r["streams"]
    rows = [
        ("streams", "streams (browser-like: resume with Last-Event-ID)", ""),
        ("generations_completed", "recycle generations completed", str(s.soak_generations)),
        ("published", f"events published ({s.soak_rate:g}/s, one channel)", ""),
        ("rss_baseline_kib", "RSS with 0 streams (baseline) KiB", ""),
        ("rss_connected_kib", "RSS after connect, before recycles KiB", ""),
        ("kib_per_stream_at_connect", "  = KiB per stream over baseline", ""),
        ("rss_after_kib", f"RSS after {r['generations_completed']} recycles KiB", ""),
        ("rss_growth_kib", "RSS growth across the recycles KiB", "~0"),
        ("growth_bytes_per_stream", "  = bytes per stream", "~0"),
        ("growth_after_gen1_kib", "RSS growth from recycle 1 to the last KiB", "~0"),
        ("history_growth_after_gen1_kib", "  replay history growth meanwhile KiB", ""),
        ("growth_bytes_per_later_recycle", "  net of history: bytes per later recycle", "~0"),
        ("rss_peak_kib", "RSS peak during the soak KiB", ""),
        ("rss_closed_kib", "RSS 2 s after every stream closed KiB", ""),
        ("history_kib_end", "replay history at the end KiB (broker gauge)", ""),
        ("recycles", "broker.reconnect (recycle) received", f">= {s.soak_generations * n:,}"),
        ("other_reconnects", "broker.reconnect, other reasons", "0"),
        ("refusals", "reconnects refused (soft 200 + broker.reconnect)", "0"),
        ("reopen_failures", "reconnect attempts failed", "0"),
        ("unexpected_closes", "streams closed without broker.reconnect", "0"),
        ("reopen_p50_ms", "reconnect: connect to preamble p50 ms", ""),
        ("reopen_p99_ms", "reconnect: connect to preamble p99 ms", ""),
        ("reopen_max_ms", "reconnect: connect to preamble max ms", ""),
        ("resets", "broker.reset received", "0"),
        ("lost", "events lost across resumes", "0"),
        ("duplicated", "events duplicated across resumes", "0"),
        ("missing_at_end", "events missing at the end", "0"),
        ("connect_seconds", "seconds to connect all", ""),
        ("soak_seconds", "soak seconds (first connect to last catch-up)", ""),
        ("server_cpu_pct", "server CPU % during the recycles", ""),
        ("server_runq_pct", "server waiting for a CPU % (runnable, not running)", "~0"),
        ("loadavg_1m", "machine load average (1 min) at the end", ""),
        ("log_problems", "broker log ERROR lines", "0"),
        ("log_problems_teardown", "  more once the clients closed (pending requests)", "0"),
    ]
    print_grid(
        ("soak", "metric", "value", "expect"),
        [("soak", label, fmt(r.get(key)), expect) for key, label, expect in rows],
    )
    print()
    header = (
        "after gen",
        "t s",
        "RSS KiB",
        "d KiB",
        "clients open",
        "broker conns",
        "recycles in window",
        "reconnect p50/p99/max ms",
        "failed reconnects",
        "resets",
        "lost",
        "dup",
        "history KiB",
    )
    body = [
        (
            "connect" if g["generation"] == 0 else str(g["generation"]),
            f"{g['t_s']:.1f}",
            f"{g['rss_kib']:,}",
            f"{g['rss_delta_kib']:+,}",
            f"{g['clients_open']:,}",
            fmt(g["broker_connections"]),
            f"{g['recycles_in_window']:,}",
            "/".join(fmt(g[k]) for k in ("reopen_p50_ms", "reopen_p99_ms", "reopen_max_ms")),
            str(g["reopen_failures_in_window"]),
            str(g["resets_total"]),
            str(g["lost_total"]),
            str(g["duplicated_total"]),
            f"{g['history_kib']:.0f}",
        )
        for g in r["per_generation"]
    ]
    print_grid(header, body, left=1)
    if r["reopen_errors"]:
        print(f"reconnect errors: {r['reopen_errors']}")


def print_drain(r: dict[str, Any], s: Settings) -> None:
    n = r["streams"]
    window = s.drain_window_seconds
    rows = [
        ("streams", "streams open at SIGTERM", ""),
        ("drain_reconnects", "broker.reconnect (drain) received", f"{n:,}"),
        ("other_reconnects", "broker.reconnect, other reasons", "0"),
        ("closed_without_reconnect", "streams closed without broker.reconnect", "0"),
        ("not_closed", "streams never closed", "0"),
        ("not_ready_ms", "/readyz not 200 after SIGTERM ms", "~0"),
        ("first_ms", "first drain reconnect after SIGTERM ms", "~0"),
        ("last_ms", "last drain reconnect after SIGTERM ms", f"~{window * 1000:,}"),
        ("last_close_ms", "last stream close after SIGTERM ms", ""),
        ("buckets_in_window", f"100 ms buckets in the {window} s window", ""),
        ("nonempty_buckets", "  non-empty", str(r["buckets_in_window"])),
        ("bucket_min", "  reconnects per bucket min", ""),
        ("bucket_max", "  reconnects per bucket max", ""),
        ("bucket_mean", "  reconnects per bucket mean", ""),
        ("bucket_even", "  perfectly even would be", ""),
        ("after_window", "reconnects after the window", "0"),
        ("exit_code", "exit code", "0"),
        ("drain_seconds", "SIGTERM to exit seconds", ""),
        ("server_cpu_pct", "server CPU % during the drain", ""),
        ("server_runq_pct", "server waiting for a CPU %", "~0"),
        ("loadavg_1m", "machine load average (1 min) at the end", ""),
        ("log_problems", "broker log ERROR lines", "0"),
    ]
    print_grid(
        ("drain", "metric", "value", "expect"),
        [("drain", label, fmt(r.get(key)), expect) for key, label, expect in rows],
    )
    print("\ndrain reconnects per 100 ms bucket, from SIGTERM (one line per second):")
    buckets = r["buckets"]
    for i in range(0, len(buckets), 10):
        print(f"  {i / 10:4.1f}s  " + " ".join(f"{c:4d}" for c in buckets[i : i + 10]))


def print_stalled(r: dict[str, Any], s: Settings) -> None:
    alone, beside = r["alone"], r["with_stalled"]
    cut = beside["cut_events"]
    rows = [
        ("p50_ms", "fast clients' latency p50 ms", "lower"),
        ("p99_ms", "fast clients' latency p99 ms", "lower"),
        ("max_ms", "fast clients' latency max ms", "lower"),
        ("cut_p50_ms", f"p50 ms, events 1..{cut} (stalled still open)", "lower"),
        ("cut_p99_ms", f"p99 ms, events 1..{cut} (stalled still open)", "lower"),
        ("cut_max_ms", f"max ms, events 1..{cut} (stalled still open)", "lower"),
        ("first_p99_ms", "first subscriber's latency p99 ms", "lower"),
        ("spread_p99_ms", "first-to-last spread p99 ms", "lower"),
        ("delivered_per_s", "delivered events/s (fast clients)", "higher"),
        ("event_bytes", "event size bytes (envelope)", ""),
        ("missing_after_drain", "events missing after drain (fast)", "lower"),
        ("gaps", "gaps (fast)", "lower"),
        ("out_of_order", "out of order / duplicate (fast)", "lower"),
        ("fast_dropped", "fast streams closed by the broker", "lower"),
        ("stalled", "stalled clients", ""),
        ("slow_closes", "slow-consumer closes (metric)", ""),
        ("all_stalled_closed_s", "all stalled closed, s after first publish", ""),
        ("stalled_open_at_end", "stalled still open at the end", ""),
        ("rss_before_kib", "broker RSS before publishing KiB", "lower"),
        ("rss_peak_kib", "broker RSS peak KiB", "lower"),
        ("rss_end_kib", "broker RSS at the end KiB", "lower"),
        ("tcp_mem_before_kib", "kernel TCP buffers before, host-wide KiB", ""),
        ("tcp_mem_peak_kib", "kernel TCP buffers peak, host-wide KiB", "lower"),
        ("tcp_mem_end_kib", "kernel TCP buffers at the end, host-wide KiB", ""),
        ("tcp_orphans_end", "orphaned TCP sockets at the end, host-wide", ""),
        ("cpu_us_per_delivery", "server CPU us per fast delivery", "lower"),
        ("server_runq_pct", "server waiting for a CPU %", ""),
        ("loadavg_1m", "machine load average (1 min) at the end", ""),
        ("log_problems", "broker log ERROR lines", "lower"),
    ]
    body = []
    for key, label, better in rows:
        row = Row("stalled", label, better, {"broker": beside.get(key), "naive": alone.get(key)})
        body.append(("stalled", label, fmt(beside.get(key)), fmt(alone.get(key)), *ratio(row)))
    body = [
        (*cells[:5], {"broker": "with", "naive": "alone"}.get(cells[5], cells[5])) for cells in body
    ]
    print_grid(
        (
            "stalled",
            "metric",
            f"with {beside['stalled']} stalled",
            "alone",
            "ratio w/a",
            "better",
        ),
        body,
    )
    if beside["all_stalled_closed_s"] is not None:
        when = f"events 1..{cut} were published before the broker had closed every stalled client"
    else:
        when = (
            f"the broker closed {beside['slow_closes']} of {beside['stalled']} stalled clients "
            f"during the run: the 'stalled still open' rows cover all {cut} events"
        )
    print(
        f"{alone['fast']} fast subscribers, {s.stalled_rate:g} events/s of "
        f"{beside['event_bytes']:,} bytes for {s.stalled_seconds:g} s; {when}"
    )
    print("\nfast clients' p99 ms of the events published in each second:")
    for name, run in (("alone", alone), (f"with {beside['stalled']} stalled", beside)):
        print(f"  {name:>16}: " + " ".join(f"{v:5.1f}" for v in run["p99_per_second_ms"]))
    closes = [0] * math.ceil(s.stalled_seconds)
    for t, v in beside["closes_timeline"]:
        if 0 <= t < len(closes):
            closes[int(t)] = int(v)
    print(f"  {'slow closes so far':>16}: " + " ".join(f"{v:5d}" for v in closes))


def print_workers(r: dict[str, Any], s: Settings) -> None:
    one, two = r.get("1", {}), r.get("2", {})
    rows = [
        ("subscribers", "subscribers (one channel)", ""),
        ("events_published", "events published", ""),
        ("target_per_s", "target deliveries/s", ""),
        ("delivered_per_s", "delivered events/s", "higher"),
        ("p50_ms", "publish->receive p50 ms", "lower"),
        ("p99_ms", "publish->receive p99 ms", "lower"),
        ("max_ms", "publish->receive max ms", "lower"),
        ("first_p99_ms", "first subscriber's latency p99 ms", "lower"),
        ("spread_p99_ms", "first-to-last spread p99 ms", "lower"),
        ("processes", "server processes (supervisor + workers)", ""),
        ("cpu_seconds", "server CPU s, all processes", ""),
        ("cpu_pct", "server CPU %, all processes (200 = both cores)", ""),
        ("cpu_us_per_delivery", "server CPU us per delivery", "lower"),
        ("client_cpu_us_per_delivery", "load-client CPU us per delivery", ""),
        ("rss_peak_kib", "server RSS sum, peak KiB", "lower"),
        ("rss_end_kib", "server RSS sum, end KiB", "lower"),
        ("streams_per_worker", "streams per worker (worker /metrics)", ""),
        ("streams_metric", "streams, admin /metrics (summed)", ""),
        ("missing_after_drain", "events missing after drain", "lower"),
        ("gaps", "gaps (lost mid-stream)", "lower"),
        ("out_of_order", "out of order / duplicate", "lower"),
        ("streams_dropped", "streams closed by the broker", "lower"),
        ("incomplete_streams", "streams incomplete at the end", "lower"),
        ("log_problems", "broker log ERROR lines", "lower"),
    ]

    def cell(run: dict[str, Any], key: str) -> str:
        v = run.get(key)
        return "/".join(f"{x:,}" for x in v) if isinstance(v, list) else fmt(v)

    body = []
    for key, label, better in rows:
        a, b = one.get(key), two.get(key)
        row = Row("workers", label, better, {"broker": b, "naive": a})
        numeric = isinstance(a, int | float) and isinstance(b, int | float)
        rat, win = ratio(row) if numeric else ("-", "")
        win = {"broker": "2 workers", "naive": "1 worker"}.get(win, win)
        body.append(("workers", label, cell(one, key), cell(two, key), rat, win))
    print_grid(("workers", "metric", "workers=1", "workers=2", "ratio 2/1", "better"), body)
    print(
        f"{s.workers_subs:,} subscribers, {s.workers_rate:g} events/s for "
        f"{s.workers_seconds:g} s; load clients, redis and the broker share "
        f"{len(os.sched_getaffinity(0))} cores"
    )
    for key, label in (("delivered_per_s", "throughput"), ("p99_ms", "p99 latency")):
        a, b = one.get(key), two.get(key)
        if a and b:
            print(f"2 workers / 1 worker, {label}: {b / a:.2f}")


def print_hostile(r: dict[str, Any], s: Settings) -> None:
    hostile.print_hostile(r, print_grid)


def machine_info(redis_version: str, naive_mode: str) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "redis_py": redis.__version__,
        "redis_server": redis_version,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "naive_mode": naive_mode,
        "note": "server, load clients, redis-server and redis-benchmark share these CPUs",
    }


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller loads, ~90 s cap")
    parser.add_argument("--only", default="", help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma list: broker,naive")
    parser.add_argument("--naive-mode", choices=("per-client", "shared"), default="per-client")
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=500,
        help="connects in flight per client process (default 500)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one field of Settings (repeatable), e.g. stalled_event_bytes=2048",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--keep", type=Path, help="keep redis and server logs in a new folder under this one"
    )
    args = parser.parse_args(argv)
    scenarios = [x for x in args.only.split(",") if x] or list(DEFAULT)
    servers = [x for x in args.servers.split(",") if x]
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    for name in servers:
        if name not in SERVERS:
            parser.error(f"unknown server {name!r}; known: {', '.join(SERVERS)}")

    settings = replace(Settings.pick(args.quick), connect_concurrency=args.connect_concurrency)
    for item in args.param:
        name, sep, value = item.partition("=")
        current = getattr(settings, name, None)
        if not sep or name not in Settings.__dataclass_fields__ or current is None:
            parser.error(f"--param {item!r}: expected NAME=VALUE with NAME a Settings field")
        try:
            settings = replace(settings, **{name: type(current)(value)})
        except ValueError:
            parser.error(f"--param {item!r}: not a {type(current).__name__}")
    cap = settings.cap_for(scenarios)
    raise_nofile()
    deadline = Deadline(cap)
    atexit.register(procs.kill_all)

    def hard_stop(signum: int, frame: FrameType | None) -> None:
        procs.kill_all()
        print("hard time cap reached: everything killed", file=sys.stderr)
        os._exit(2)

    signal.signal(signal.SIGALRM, hard_stop)
    signal.alarm(int(cap) + 30)

    runners: dict[str, Callable[[Context, str], dict[str, Any]]] = {
        "idle": idle,
        "fanout": fanout,
        "ingest": ingest,
        "soak": soak,
        "drain": drain,
        "stalled": stalled,
        "workers": workers,
        "hostile": hostile.hostile,
    }
    raw: dict[str, dict[str, dict[str, Any]]] = {}
    errors: list[str] = []
    started = time.monotonic()
    workdir: contextlib.AbstractContextManager[str]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        workdir = contextlib.nullcontext(tempfile.mkdtemp(prefix="sse-bench-", dir=args.keep))
    else:
        workdir = tempfile.TemporaryDirectory(prefix="sse-bench-")
    with workdir as tmp:
        print(f"work dir (redis and server logs): {tmp}", file=sys.stderr)
        redis_server = RedisServer(Path(tmp))
        ctx = Context(settings, redis_server, Path(tmp), deadline, args.naive_mode)
        info = machine_info(redis_server.version(), args.naive_mode)
        print(
            f"cpus={info['cpus_usable']} (shared by server, clients, redis) "
            f"loadavg={info['loadavg_at_start'][0]:.2f} python={info['python']} "
            f"redis={info['redis_server']} naive={args.naive_mode} "
            f"{'quick' if args.quick else 'full'} cap={cap:.0f}s",
            file=sys.stderr,
        )
        try:
            for scenario in scenarios:
                raw[scenario] = {}
                kinds = servers
                if scenario in BROKER_ONLY:
                    kinds = [k for k in servers if k == "broker"]
                    if not kinds:
                        errors.append(f"{scenario}: skipped, it runs the broker only")
                for kind in kinds:
                    if deadline.left() <= 0:
                        errors.append(f"{scenario}/{kind}: skipped, time cap reached")
                        continue
                    t = time.monotonic()
                    print(f"{scenario} / {kind} ...", file=sys.stderr, flush=True)
                    try:
                        raw[scenario][kind] = runners[scenario](ctx, kind)
                    except (BenchError, OSError, redis.RedisError) as exc:
                        errors.append(f"{scenario}/{kind}: {exc}")
                        print(f"  failed: {exc}", file=sys.stderr)
                    print(f"  {time.monotonic() - t:.1f}s", file=sys.stderr)
        finally:
            redis_server.close()
            procs.kill_all()
    signal.alarm(0)

    rows = [
        row
        for scenario in scenarios
        if scenario in COMPARED
        for row in rows_for(scenario, raw.get(scenario, {}))
    ]
    if rows:
        print()
        print_table(rows)
        print("ratio = broker / naive")
        if "ingest" in raw and "naive" in raw["ingest"] and raw["ingest"]["naive"].get("source"):
            print(
                "ingest/naive is a standalone redis-py PubSub.listen() reader doing the naive "
                "server's per-message work (decode + frame), not a server counter"
            )
    printers = {
        "soak": print_soak,
        "drain": print_drain,
        "stalled": print_stalled,
        "workers": print_workers,
        "hostile": print_hostile,
    }
    for scenario in scenarios:
        result = raw.get(scenario, {}).get("broker")
        if scenario in printers and result is not None:
            print()
            printers[scenario](result, settings)
    for n, run in raw.get("workers", {}).get("broker", {}).items():
        if "error" in run:
            errors.append(f"workers/server.workers={n}: {run['error']}")
    if (fuzzed := raw.get("hostile", {}).get("broker")) is not None:
        if fuzzed["broken_rules"]:
            errors.append(f"hostile: {fuzzed['broken_rules']} broken rules (listed above)")
        for name, t in fuzzed["targets"].items():
            if t["tracebacks"] or t["error_lines"] or t["connections_end"]:
                errors.append(
                    f"hostile/{name}: {t['tracebacks']} tracebacks, {t['error_lines']} ERROR "
                    f"lines, {t['connections_end']:g} connections at the end"
                )
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    for err in errors:
        print(f"ERROR {err}")
    if args.json is not None:
        doc = {
            "machine": info,
            "settings": asdict(settings),
            "results": raw,
            "rows": [asdict(r) for r in rows],
            "errors": errors,
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
