"""Hot-path benchmark: the broker against a naive aiohttp broker, same machine, same run.

    python tests/bench/run.py [--quick] [--only idle,fanout,ingest] [--json out.json]

Starts its own redis-server, then for each scenario starts a fresh server
(the real broker, then the naive baseline from ``naive.py``), loads it with
the lean client of ``loadclient.py`` and prints one table of
broker / naive ratios. The machine is shared and noisy: compare ratios from
one run, not absolute numbers across runs. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import orjson
import procs
import redis
from loadclient import raise_nofile
from procs import BenchError, ClientPool, Deadline, RedisServer, Server

SERVERS = ("broker", "naive")
SCENARIOS = ("idle", "fanout", "ingest")


@dataclass(frozen=True)
class Settings:
    idle_conns: int
    fanout_subs: int
    fanout_rate: float
    fanout_seconds: float
    drain_seconds: float
    flood_count: int
    cap_seconds: float
    connect_concurrency: int = 500  # in flight per client process
    settle_seconds: float = 2.0

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
            )
        return cls(
            idle_conns=5000,
            fanout_subs=1000,
            fanout_rate=50,
            fanout_seconds=20,
            drain_seconds=20,
            flood_count=1_000_000,
            cap_seconds=360,
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

    def server(self, kind: str, tag: str) -> Server:
        max_conn = max(self.settings.idle_conns, self.settings.fanout_subs) + 1000
        return procs.start_server(
            kind, self.redis.url, self.tmp, tag, self.deadline, self.naive_mode, max_conn
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


def fanout(ctx: Context, kind: str) -> dict[str, float | None]:
    s = ctx.settings
    server = ctx.server(kind, "fanout")
    pool = None
    publisher = redis.Redis(port=ctx.redis.port, socket_timeout=10)
    try:
        pool = ctx.clients(s.fanout_subs, server)
        results = pool.connect(
            s.fanout_subs,
            "fan",
            concurrency=s.connect_concurrency,
            timeout=ctx.deadline.left(60),
            track=True,
        )
        subs = sum(r["ok"] for r in results)
        if subs < s.fanout_subs:
            errors = [r["errors"] for r in results if r["errors"]]
            why = f"only {subs}/{s.fanout_subs} subscribers connected: {errors}"
            if not subs:
                raise BenchError(why)
            print(f"  {kind}: {why}", file=sys.stderr)
        count = round(s.fanout_rate * s.fanout_seconds)
        pool.expect(count)
        time.sleep(0.5)
        cpu0 = procs.cpu_seconds(server.pid)
        first_ns = time.time_ns()
        t0 = time.monotonic()
        for i in range(count):
            ctx.deadline.check("fan-out publishing")
            delay = t0 + i / s.fanout_rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            payload = orjson.dumps({"data": f"{i + 1}:{time.time_ns()}"})
            publisher.publish("sse:fan", payload)
        publish_seconds = time.monotonic() - t0
        collected = pool.collect(ctx.deadline.left(s.drain_seconds))
        cpu1 = procs.cpu_seconds(server.pid)
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
            "target_per_s": subs * s.fanout_rate,
            "expected": expected,
            "received": received,
            "missing_after_drain": sum(r["missing_total"] for r in collected),
            "gaps": sum(r["gaps_total"] for r in collected),
            "out_of_order": sum(r["disorder_total"] for r in collected),
            "streams_dropped": sum(r["dropped"] for r in collected),
            "incomplete_streams": subs - sum(r["complete_streams"] for r in collected),
            "cpu_us_per_delivery": (cpu1 - cpu0) * 1e6 / received if received else None,
            "client_cpu_us_per_delivery": client_cpu * 1e6 / received if received else None,
        }
    finally:
        publisher.close()
        if pool is not None:
            pool.close()
        server.stop()


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


def print_table(rows: list[Row]) -> None:
    header = ("scenario", "metric", "broker", "naive", "ratio b/n", "better")
    body = [
        (r.scenario, r.metric, fmt(r.values["broker"]), fmt(r.values["naive"]), *ratio(r))
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in body:
        print(line(r))


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
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--keep", type=Path, help="keep redis and server logs in a new folder under this one"
    )
    args = parser.parse_args(argv)
    scenarios = [x for x in args.only.split(",") if x] or list(SCENARIOS)
    servers = [x for x in args.servers.split(",") if x]
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    for name in servers:
        if name not in SERVERS:
            parser.error(f"unknown server {name!r}; known: {', '.join(SERVERS)}")

    settings = replace(Settings.pick(args.quick), connect_concurrency=args.connect_concurrency)
    raise_nofile()
    deadline = Deadline(settings.cap_seconds)
    atexit.register(procs.kill_all)

    def hard_stop(signum: int, frame: FrameType | None) -> None:
        procs.kill_all()
        print("hard time cap reached: everything killed", file=sys.stderr)
        os._exit(2)

    signal.signal(signal.SIGALRM, hard_stop)
    signal.alarm(int(settings.cap_seconds) + 30)

    runners: dict[str, Callable[[Context, str], dict[str, float | None]]] = {
        "idle": idle,
        "fanout": fanout,
        "ingest": ingest,
    }
    raw: dict[str, dict[str, dict[str, float | None]]] = {}
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
            f"{'quick' if args.quick else 'full'} cap={settings.cap_seconds:.0f}s",
            file=sys.stderr,
        )
        try:
            for scenario in scenarios:
                raw[scenario] = {}
                for kind in servers:
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

    rows = [row for scenario in scenarios for row in rows_for(scenario, raw.get(scenario, {}))]
    print()
    print_table(rows)
    print(f"\ntotal {time.monotonic() - started:.0f}s; ratio = broker / naive")
    if "ingest" in raw and "naive" in raw["ingest"] and raw["ingest"]["naive"].get("source"):
        print(
            "ingest/naive is a standalone redis-py PubSub.listen() reader doing the naive "
            "server's per-message work (decode + frame), not a server counter"
        )
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
