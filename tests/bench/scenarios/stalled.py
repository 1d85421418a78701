"""(f) ``stalled``: fast subscribers' latency alone, then beside clients that never read."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import orjson
import procs
import redis
from procs import BenchError
from report import Figure, Metric, Row, figures_of, pair_cells, print_grid
from settings import Settings
from targets import Context

from scenarios.base import Result, Scenario
from scenarios.measure import (
    Sampler,
    completeness,
    deliveries,
    latency_summary,
    log_problems,
    percentile,
    publish_paced,
)


def p99_per_second(collected: list[dict[str, Any]], rate: float) -> list[float]:
    """p99 latency (ms) of the deliveries of the events published in each second."""
    per: dict[int, list[int]] = {}
    for seq, us in deliveries(collected):
        per.setdefault(int((seq - 1) // rate), []).append(us)
    return [percentile(sorted(per[k]), 0.99) / 1000 for k in sorted(per)]


def latency_upto(collected: list[dict[str, Any]], cut: int) -> dict[str, float | None]:
    """p50/p99/max of the deliveries of events 1..cut."""
    lat = sorted(us for seq, us in deliveries(collected) if seq <= cut)
    return {
        "cut_p50_ms": percentile(lat, 0.50) / 1000,
        "cut_p99_ms": percentile(lat, 0.99) / 1000,
        "cut_max_ms": lat[-1] / 1000 if lat else None,
    }


def stalled_run(ctx: Context, kind: str, n_stalled: int) -> tuple[Result, list[dict[str, Any]]]:
    """``stalled_fast`` tracked subscribers (+ ``n_stalled`` that never read) at
    ``stalled_rate`` events/s of ``stalled_event_bytes`` each."""
    s = ctx.settings
    with ctx.started(kind, f"stalled-{n_stalled}") as run:
        server = run.server
        publisher = redis.Redis(port=ctx.redis.port, socket_timeout=10)
        run.defer(publisher.close)
        sampler = Sampler(server, "sse_broker_slow_consumer_closes_total")
        run.defer(sampler.stop.set)
        pool = run.clients(s.stalled_fast)
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
            for sock in procs.open_stalled(n_stalled, "127.0.0.1", server.port, request):
                run.defer(sock.close)
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
        first_ns, t0, publish_seconds = publish_paced(
            publisher, "sse:stall", count, s.stalled_rate, ctx.deadline, "stalled publishing", pad
        )
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
        done = completeness(collected, first_ns)
        dropped = done.pop("dropped")
        received = done["received"]
        if not server.alive():
            raise BenchError(f"{kind} died in the stalled scenario; see {server.log}")
        result: Result = {
            "fast": subs,
            "stalled": n_stalled,
            "events": count,
            "event_bytes": len(orjson.dumps({"data": f"{count}:{time.time_ns()}{pad}"})),
            "publish_seconds": publish_seconds,
            **latency_summary(collected, count),
            **done,
            "fast_dropped": dropped,
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


def stalled(ctx: Context, kind: str) -> Result:
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


def rows(cut: int) -> list[Metric]:
    """(key, label, better) of the stalled table; ``cut``: the events published while
    stalled clients were still open."""
    return [
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


def print_stalled(r: Result, s: Settings) -> None:
    alone, beside = r["alone"], r["with_stalled"]
    cut = beside["cut_events"]
    body = [
        pair_cells(
            Row("stalled", label, better, {"with": beside.get(key), "alone": alone.get(key)}),
            "with",
            "alone",
        )
        for key, label, better in rows(cut)
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


def figures(r: Result, s: Settings) -> list[Figure]:
    alone, beside = r["alone"], r["with_stalled"]
    table = rows(beside["cut_events"])
    return figures_of(alone, table, "alone: ") + figures_of(beside, table, "with stalled: ")


SCENARIO = Scenario("stalled", stalled, report=print_stalled, figures=figures)
