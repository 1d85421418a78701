"""(g) ``workers``: the fan-out of (b) against ``server.workers`` = 1, then 2."""

from __future__ import annotations

import os
import sys
from typing import Any

import procs
import redis
from procs import BenchError
from report import Figure, Metric, Row, figures_of, pair_cells, print_grid, print_ratios
from settings import Settings
from targets import Context

from scenarios.base import Result, Scenario
from scenarios.fanout import fanout_measure
from scenarios.measure import COMPLETENESS, END_CHECKS, TreeRss, log_problems

METRICS: list[Metric] = [
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
    *COMPLETENESS,
    *END_CHECKS,
]
SIDES = ("1 worker", "2 workers")


def workers_run(ctx: Context, kind: str, n: int) -> Result:
    """One fan-out run against ``server.workers = n`` (n = 1: the plain single process)."""
    s = ctx.settings
    with ctx.started(kind, f"workers{n}", (f"server.workers={n}",)) as run:
        server = run.server
        sampler = TreeRss(server.pid)
        run.defer(sampler.stop.set)
        pids = procs.tree(server.pid)
        workers = [p for p in pids if p != server.pid] if n > 1 else [server.pid]
        if len(workers) != n:
            raise BenchError(f"workers={n}: found {len(workers)} worker processes ({pids})")
        sampler.start()
        pool = run.clients(s.workers_subs)
        result: Result = dict(
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


def workers(ctx: Context, kind: str) -> Result:
    runs: dict[str, Any] = {}
    for n in (1, 2):
        print(f"  server.workers={n} ...", file=sys.stderr, flush=True)
        try:
            runs[str(n)] = workers_run(ctx, kind, n)
        except (BenchError, OSError, redis.RedisError) as exc:
            runs[str(n)] = {"error": str(exc)}
            print(f"  failed: {exc}", file=sys.stderr)
    return runs


def print_workers(r: Result, s: Settings) -> None:
    one, two = r.get("1", {}), r.get("2", {})
    body = [
        pair_cells(
            Row("workers", label, better, {SIDES[0]: one.get(key), SIDES[1]: two.get(key)}),
            *SIDES,
            over=SIDES[1],
        )
        for key, label, better in METRICS
    ]
    print_grid(("workers", "metric", "workers=1", "workers=2", "ratio 2/1", "better"), body)
    print(
        f"{s.workers_subs:,} subscribers, {s.workers_rate:g} events/s for "
        f"{s.workers_seconds:g} s; load clients, redis and the broker share "
        f"{len(os.sched_getaffinity(0))} cores"
    )
    print_ratios(
        "2 workers / 1 worker",
        one,
        two,
        (("delivered_per_s", "throughput"), ("p99_ms", "p99 latency")),
    )


def figures(r: Result, s: Settings) -> list[Figure]:
    one, two = r.get("1", {}), r.get("2", {})
    return figures_of(one, METRICS, "workers=1: ") + figures_of(two, METRICS, "workers=2: ")


def problems(r: Result) -> list[str]:
    return [f"workers/server.workers={n}: {run['error']}" for n, run in r.items() if "error" in run]


SCENARIO = Scenario("workers", workers, report=print_workers, figures=figures, problems=problems)
