"""(a) ``idle``: memory and connect time of N idle streams."""

from __future__ import annotations

import time

import procs
from procs import BenchError
from report import Metric
from targets import Context

from scenarios.base import Result, Scenario
from scenarios.measure import streams_connected

METRICS: list[Metric] = [
    ("kib_per_conn", "RSS KiB per idle stream", "lower"),
    ("connect_seconds", "seconds to connect all + preamble", "lower"),
    ("connects_per_s", "connects/s", "higher"),
    ("cpu_us_per_connect", "server CPU us per connect", "lower"),
    ("connected", "streams connected", ""),
    ("failed", "connects failed", "lower"),
]


def idle(ctx: Context, kind: str) -> Result:
    s = ctx.settings
    with ctx.started(kind, "idle") as run:
        server = run.server
        time.sleep(1.0)
        rss0 = procs.rss_kib(server.pid)
        cpu0 = procs.cpu_seconds(server.pid)
        pool = run.clients(s.idle_conns)
        results = pool.connect(
            s.idle_conns,
            "idle",
            concurrency=s.connect_concurrency,
            timeout=ctx.deadline.left(60),
            track=False,
        )
        cpu1 = procs.cpu_seconds(server.pid)
        ok = streams_connected(results, s.idle_conns, kind)
        failed = sum(r["failed"] for r in results)
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


SCENARIO = Scenario("idle", idle, METRICS)
