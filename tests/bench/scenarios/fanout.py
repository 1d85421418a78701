"""(b) ``fanout``: publish->receive latency of S subscribers on one channel.

:func:`fanout_measure` is also the measurement of ``workers``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import procs
import redis
from procs import ClientPool
from report import Metric
from targets import Context, Server

from scenarios.base import Result, Scenario
from scenarios.measure import (
    COMPLETENESS,
    completeness,
    latency_summary,
    publish_paced,
    streams_connected,
)

METRICS: list[Metric] = [
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
    *COMPLETENESS,
    ("streams_dropped", "streams closed by server", "lower"),
]


def fanout_measure(
    ctx: Context,
    server: Server,
    pool: ClientPool,
    subs_wanted: int,
    rate: float,
    seconds: float,
    drain_seconds: float,
    pids: Sequence[int] | None = None,
) -> Result:
    """Open ``subs_wanted`` tracked streams on ``fan``, publish ``rate``/s for ``seconds``,
    collect. Server CPU is summed over ``pids`` (default: the server process)."""
    pids = list(pids) if pids else [server.pid]
    results = pool.connect(
        subs_wanted,
        "fan",
        concurrency=ctx.settings.connect_concurrency,
        timeout=ctx.deadline.left(60),
        track=True,
    )
    subs = streams_connected(results, subs_wanted, server.kind, "subscribers")
    count = round(rate * seconds)
    pool.expect(count)
    time.sleep(0.5)
    publisher = redis.Redis(port=ctx.redis.port, socket_timeout=10)
    try:
        cpu0 = sum(procs.cpu_seconds(p) for p in pids)
        first_ns, t0, publish_seconds = publish_paced(
            publisher, "sse:fan", count, rate, ctx.deadline, "fan-out publishing"
        )
    finally:
        publisher.close()
    collected = pool.collect(ctx.deadline.left(drain_seconds))
    cpu1 = sum(procs.cpu_seconds(p) for p in pids)
    wall = time.monotonic() - t0
    done = completeness(collected, first_ns)
    rate_seen, dropped = done.pop("delivered_per_s"), done.pop("dropped")
    received = done["received"]
    client_cpu = sum(r["cpu_seconds"] for r in collected)
    return {
        "subscribers": subs,
        "events_published": count,
        "publish_seconds": publish_seconds,
        **latency_summary(collected, count),
        "delivered_per_s": rate_seen,
        "target_per_s": subs * rate,
        "expected": subs * count,
        **done,
        "streams_dropped": dropped,
        "incomplete_streams": subs - sum(r["complete_streams"] for r in collected),
        "cpu_seconds": cpu1 - cpu0,
        "cpu_pct": (cpu1 - cpu0) * 100 / wall if wall > 0 else None,
        "cpu_us_per_delivery": (cpu1 - cpu0) * 1e6 / received if received else None,
        "client_cpu_us_per_delivery": client_cpu * 1e6 / received if received else None,
    }


def fanout(ctx: Context, kind: str) -> Result:
    s = ctx.settings
    with ctx.started(kind, "fanout") as run:
        pool = run.clients(s.fanout_subs)
        return fanout_measure(
            ctx, run.server, pool, s.fanout_subs, s.fanout_rate, s.fanout_seconds, s.drain_seconds
        )


SCENARIO = Scenario("fanout", fanout, METRICS)
