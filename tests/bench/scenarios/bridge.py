"""(i) ``bridge``: what bridge mode costs against stream mode, same load, same run.

Two fresh brokers, one after the other, each with a stream key of its own:
``ingest.mode=stream`` fed by the publisher's ``XADD ... MINID ~ <now - ttl>``
(as the README shows publishers doing), then ``ingest.mode=bridge`` fed by
plain ``PUBLISH`` (the broker, holding the lease, appends to the stream and
reads it back like stream mode). The load is the fan-out of (b) spread over
a few channels: ``bridge_subs`` tracked streams, ``bridge_subs /
bridge_channels`` per channel (one client process per channel), each channel
``bridge_rate`` events/s for ``bridge_seconds``; every tick the publisher
sends one event per channel in one pipeline, in both modes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import procs
import redis
from procs import BenchError, ClientPool, Deadline
from report import Figure, Metric, Row, figures_of, pair_cells, print_grid, print_ratios
from settings import Settings
from targets import Context, Server

from scenarios.base import Result, Scenario
from scenarios.measure import (
    COMPLETENESS,
    END_CHECKS,
    Sampler,
    completeness,
    deliveries,
    latency_summary,
    log_problems,
    percentile,
    streams_connected,
)

SIDES = ("stream", "bridge")
TTL_SECONDS = 300  # replay.ttl_seconds (default): what both trim to

METRICS: list[Metric] = [
    ("subscribers", "subscribers (all channels)", ""),
    ("channels", "channels (one client process each)", ""),
    ("events_published", "events published (all channels)", ""),
    ("target_per_s", "target deliveries/s", ""),
    ("delivered_per_s", "delivered events/s", "higher"),
    ("p50_ms", "publish->receive p50 ms", "lower"),
    ("p99_ms", "publish->receive p99 ms", "lower"),
    ("max_ms", "publish->receive max ms", "lower"),
    ("first_p50_ms", "first subscriber's latency p50 ms", "lower"),
    ("first_p99_ms", "first subscriber's latency p99 ms", "lower"),
    ("spread_p99_ms", "first-to-last spread p99 ms", "lower"),
    ("cpu_us_per_delivery", "server CPU us per delivery", "lower"),
    ("cpu_us_per_event", "server CPU us per published event", "lower"),
    ("cpu_pct", "server CPU % (publish to end of collection)", "lower"),
    ("redis_cpu_us_per_event", "redis-server CPU us per published event", "lower"),
    ("client_cpu_us_per_delivery", "load-client CPU us per delivery", ""),
    ("lag_max_ms", "bridge lag max ms (sse_broker_bridge_lag_seconds)", ""),
    ("appended", "appended by the bridge (broker counter)", ""),
    ("stream_entries", "stream entries at the end (XLEN)", ""),
    *COMPLETENESS,
    *END_CHECKS,
]


def publish_ticks(
    client: redis.Redis,
    send: Callable[[Any, str, bytes], object],
    channels: list[str],
    count: int,
    rate: float,
    deadline: Deadline,
) -> tuple[int, float, float]:
    """Tick ``i`` (1..``count``) at ``rate``/s: ``send(pipe, channel, payload)`` once per
    channel, payload ``<i>:<time_ns>``, one pipeline per tick. Returns the wall clock
    of the start (ns), its monotonic time and the seconds publishing took."""
    first_ns = time.time_ns()
    t0 = time.monotonic()
    for i in range(count):
        deadline.check("bridge publishing")
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pipe = client.pipeline(transaction=False)
        for channel in channels:
            send(pipe, channel, f"{i + 1}:{time.time_ns()}".encode())
        pipe.execute()
    return first_ns, t0, time.monotonic() - t0


def per_event(by_channel: list[list[dict[str, Any]]], count: int) -> dict[str, float]:
    """First subscriber's latency and first-to-last spread per event, an event being
    (channel, seq): :func:`latency_summary`'s per-event figures across channels."""
    firsts: list[int] = []
    spreads: list[int] = []
    for collected in by_channel:
        first = [2**62] * (count + 1)
        last = [-(2**62)] * (count + 1)
        for seq, us in deliveries(collected):
            if 0 < seq <= count:
                first[seq] = min(first[seq], us)
                last[seq] = max(last[seq], us)
        seen = [i for i in range(1, count + 1) if last[i] >= first[i]]
        firsts += (first[i] for i in seen)
        spreads += (last[i] - first[i] for i in seen)
    firsts.sort()
    spreads.sort()
    return {
        "first_p50_ms": percentile(firsts, 0.50) / 1000,
        "first_p99_ms": percentile(firsts, 0.99) / 1000,
        "spread_p99_ms": percentile(spreads, 0.99) / 1000,
    }


def wait_leader(server: Server, deadline: Deadline, seconds: float = 15) -> None:
    """Until the broker holds the bridge lease (it appends nothing before)."""
    until = time.monotonic() + deadline.left(seconds)
    while server.metrics().get("sse_broker_bridge_leader") != 1:
        if time.monotonic() > until:
            raise BenchError(f"bridge: no lease after {seconds:g}s; see {server.log}")
        time.sleep(0.05)


def bridge_run(ctx: Context, kind: str, mode: str) -> Result:
    """The fan-out over ``bridge_channels`` channels against one broker in ``mode``."""
    s = ctx.settings
    key = f"bench:{mode}:stream"
    ctx.redis.client.delete(key, f"{key}:bridge:lease", f"{key}:bridge:fence")
    flags = (f"ingest.mode={mode}", f"ingest.stream_key={key}")
    channels = [f"br{i}" for i in range(s.bridge_channels)]
    per_channel = s.bridge_subs // len(channels)
    count = round(s.bridge_rate * s.bridge_seconds)
    with ctx.started(kind, f"bridge-{mode}", flags) as run:
        server = run.server
        if mode == "bridge":
            wait_leader(server, ctx.deadline)
        sampler = Sampler(server, "sse_broker_bridge_lag_seconds" if mode == "bridge" else None)
        run.defer(sampler.stop.set)
        pools: list[ClientPool] = [run.clients(per_channel) for _ in channels]
        subs = 0
        for pool, channel in zip(pools, channels, strict=True):
            results = pool.connect(
                per_channel,
                channel,
                concurrency=s.connect_concurrency,
                timeout=ctx.deadline.left(60),
                track=True,
            )
            subs += streams_connected(results, per_channel, f"{mode}/{channel}", "subscribers")
        for pool in pools:
            pool.expect(count)
        time.sleep(0.5)

        def send(pipe: Any, channel: str, data: bytes) -> None:
            if mode == "stream":
                min_id = f"{int((time.time() - TTL_SECONDS) * 1000)}-0"
                pipe.execute_command(
                    "XADD", key, "MINID", "~", min_id, "*", "channel", channel, "data", data
                )
            else:
                pipe.publish(f"sse:{channel}", orjson.dumps({"data": data.decode()}))

        publisher = redis.Redis(port=ctx.redis.port, socket_timeout=10)
        redis_pid = ctx.redis.proc.pid
        sampler.start()
        try:
            cpu0, rcpu0 = procs.cpu_seconds(server.pid), procs.cpu_seconds(redis_pid)
            first_ns, t0, publish_seconds = publish_ticks(
                publisher, send, channels, count, s.bridge_rate, ctx.deadline
            )
        finally:
            publisher.close()
        until = time.monotonic() + ctx.deadline.left(s.drain_seconds)
        by_channel = [pool.collect(max(0.5, until - time.monotonic())) for pool in pools]
        cpu1, rcpu1 = procs.cpu_seconds(server.pid), procs.cpu_seconds(redis_pid)
        wall = time.monotonic() - t0
        sampler.stop.set()
        sampler.join(1)
        metrics = server.metrics()
        if not server.alive():
            raise BenchError(f"{mode}: the broker died; see {server.log}")
        collected = [r for rs in by_channel for r in rs]
        done = completeness(collected, first_ns)
        rate_seen, dropped = done.pop("delivered_per_s"), done.pop("dropped")
        received = done["received"]
        published = count * len(channels)
        lags = [v for _, _, v in sampler.samples if v is not None]
        summary = latency_summary(collected, count)
        result: Result = {
            "subscribers": subs,
            "channels": len(channels),
            "events_published": published,
            "publish_seconds": publish_seconds,
            "p50_ms": summary["p50_ms"],
            "p99_ms": summary["p99_ms"],
            "max_ms": summary["max_ms"],
            **per_event(by_channel, count),
            "delivered_per_s": rate_seen,
            "target_per_s": subs * s.bridge_rate,
            "expected": subs * count,
            **done,
            "streams_dropped": dropped,
            "incomplete_streams": subs - sum(r["complete_streams"] for r in collected),
            "cpu_seconds": cpu1 - cpu0,
            "cpu_pct": (cpu1 - cpu0) * 100 / wall if wall > 0 else None,
            "cpu_us_per_delivery": (cpu1 - cpu0) * 1e6 / received if received else None,
            "cpu_us_per_event": (cpu1 - cpu0) * 1e6 / published,
            "redis_cpu_us_per_event": (rcpu1 - rcpu0) * 1e6 / published,
            "client_cpu_us_per_delivery": (
                sum(r["cpu_seconds"] for r in collected) * 1e6 / received if received else None
            ),
            "lag_max_ms": max(lags) * 1000 if lags else None,
            "appended": metrics.get("sse_broker_bridge_appended_total"),
            "stream_entries": int(ctx.redis.client.xlen(key)),
            "log_problems": log_problems(server.log),
        }
    ctx.redis.client.delete(key, f"{key}:bridge:lease", f"{key}:bridge:fence")
    return result


def bridge(ctx: Context, kind: str) -> Result:
    runs: dict[str, Any] = {}
    for mode in SIDES:
        print(f"  ingest.mode={mode} ...", file=sys.stderr, flush=True)
        try:
            runs[mode] = bridge_run(ctx, kind, mode)
        except (BenchError, OSError, redis.RedisError) as exc:
            runs[mode] = {"error": str(exc)}
            print(f"  failed: {exc}", file=sys.stderr)
    return runs


def print_bridge(r: Result, s: Settings) -> None:
    stream, bridged = r.get("stream", {}), r.get("bridge", {})
    body = [
        pair_cells(
            Row("bridge", label, better, {"stream": stream.get(key), "bridge": bridged.get(key)}),
            *SIDES,
            over="bridge",
        )
        for key, label, better in METRICS
    ]
    print_grid(("bridge", "metric", "stream", "bridge", "ratio b/s", "better"), body)
    print(
        f"{s.bridge_subs:,} subscribers over {s.bridge_channels} channels, "
        f"{s.bridge_rate:g} events/s per channel for {s.bridge_seconds:g} s; stream mode: the "
        "publisher XADDs (MINID ~ now - 300 s); bridge mode: it PUBLISHes, the broker appends"
    )
    print_ratios(
        "bridge / stream",
        stream,
        bridged,
        (
            ("p50_ms", "p50 latency"),
            ("p99_ms", "p99 latency"),
            ("cpu_us_per_delivery", "server CPU per delivery"),
        ),
    )


def figures(r: Result, s: Settings) -> list[Figure]:
    stream, bridged = r.get("stream", {}), r.get("bridge", {})
    return figures_of(stream, METRICS, "stream: ") + figures_of(bridged, METRICS, "bridge: ")


def problems(r: Result) -> list[str]:
    out = [f"bridge/ingest.mode={m}: {run['error']}" for m, run in r.items() if "error" in run]
    for mode, run in r.items():
        counts = {k: run.get(k) or 0 for k in ("missing_after_drain", "gaps", "out_of_order")}
        if any(counts.values()):
            out.append(f"bridge/ingest.mode={mode}: incomplete delivery {counts}")
    return out


SCENARIO = Scenario("bridge", bridge, report=print_bridge, figures=figures, problems=problems)
