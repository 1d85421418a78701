"""(j) ``handover``: SIGKILL the bridge leader under load; what the clients lose,
get twice, or are told (issue 13: "events lost (goal 0), duplicated (goal 0)
and resets, over 10 runs").

Each run (``handover_runs``; quick 3) starts from nothing: a fresh
redis-server, ``handover_brokers`` (3) brokers with ``ingest.mode=bridge`` on
free loopback ports, and ``handover_clients`` (16) browser-like clients, each
subscribed to ``handover_channels / handover_clients`` (4) of the 64 channels
(client ``i``: channels ``i, i + 16, ...``). A client reads with the WHATWG
parser of ``tests/sse_client.py``; whenever its stream ends (the process died,
``broker.reconnect``, 30 s of silence) it reconnects, with ``Last-Event-ID``,
to a live process picked at random. A publisher PUBLISHes
``{"data": "<seq>:<time_ns>"}`` at ``handover_rate`` (1,000) events/s
round-robin over the channels for ``handover_seconds`` (12), ``seq`` global;
``handover_kill_after`` (5) seconds in, plus up to 1 s of jitter, the process whose
``sse_broker_bridge_leader`` is 1 gets SIGKILL, and the survivors' gauges are
polled every 20 ms until one reports 1 (the *takeover time*). Then an end
marker goes out on every channel and each client waits for the markers of
all its channels (bounded).

Per run: events lost (published on a client's channels, acknowledged by
Redis, never received), duplicated, out of order, lost by a client that got
no ``broker.reset`` (silent), resets and their reasons, hole markers written,
the takeover time, what the new leader appended from its buffer (its log),
reconnects, the longest pause any client saw between two events, and
publish->receive latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import redis
import redis.asyncio as aioredis
from fleet import PREFIX, Follower, gauge, leaders, publish_load, wait_leader
from procs import BenchError, RedisServer
from report import Figure, fmt, print_grid
from settings import Settings
from targets import Context, Server, start_server

from scenarios.base import Result, Scenario
from scenarios.measure import log_problems, percentile

STREAM_KEY = "sse:stream"  # ingest.stream_key (default)
TOOK = re.compile(r"took the lease \((\S+)\); appending (\d+) buffered messages( after a hole)?")


async def drive(ctx: Context, fleet: list[Server], redis_port: int) -> Result:
    """Clients, load, the kill, the end markers; what each client saw."""
    s = ctx.settings
    channels = [f"h.{i}" for i in range(s.handover_channels)]
    k = s.handover_clients
    out: Result = {}
    held = await wait_leader(fleet, ctx.deadline.left(15))
    if len(held) != 1:
        raise BenchError(f"{len(held)} leaders before the load; see {fleet[0].log}")
    publisher = aioredis.Redis(port=redis_port, socket_timeout=10)
    async with aiohttp.ClientSession() as session:
        followers = [Follower(fleet, tuple(channels[i::k]), session).start() for i in range(k)]
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ctx.deadline.left(15)):
                    await asyncio.gather(*(f.live.wait() for f in followers))
            if not all(f.live.is_set() for f in followers):
                failures = [dict(f.failures) for f in followers]
                raise BenchError(f"clients did not connect: {failures}")
            load = asyncio.create_task(
                publish_load(publisher, channels, s.handover_rate, s.handover_seconds, ctx.deadline)
            )
            try:
                # Jittered by one lease renewal period (1 s at the default 3 s lease),
                # so that the runs sample the kill's phase against the renewals.
                kill_at = s.handover_kill_after + random.uniform(0, 1)
                await asyncio.sleep(kill_at)
                out["kill_at_s"] = kill_at
                held = await leaders(fleet)
                if len(held) != 1:
                    raise BenchError(f"{len(held)} leaders at the kill")
                victim = held[0]
                victim.proc.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                out["killed"] = fleet.index(victim)
                survivors = [b for b in fleet if b is not victim]
                new = await wait_leader(survivors, ctx.deadline.left(30))
                if new:
                    out["takeover_ms"] = (time.monotonic() - killed_at) * 1000
                    out["new_leader"] = fleet.index(new[0])
                sent = await load
            finally:
                if not load.done():
                    load.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await load
            for channel in channels:
                await publisher.publish(PREFIX + channel, f'{{"data": "end:{channel}"}}')
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ctx.deadline.left(30)):
                    await asyncio.gather(*(f.done.wait() for f in followers))
        finally:
            for f in followers:
                await f.stop()
            await publisher.aclose()
    totals: dict[str, float] = {}
    for name in ("takeovers", "holes", "appended"):
        values = await asyncio.gather(
            *(gauge(b, f"sse_broker_bridge_{name}_total") for b in survivors)
        )
        totals[name] = sum(v or 0 for v in values)
    out["survivors"] = totals
    out["sent"] = sent
    out["followers"] = followers
    return out


def start_fleet(
    ctx: Context, kind: str, redis_url: str, tmp: Path, run: int, stack: contextlib.ExitStack
) -> list[Server]:
    """``handover_brokers`` bridge-mode brokers, started at once; stopped by ``stack``."""
    n = ctx.settings.handover_brokers
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(
                start_server,
                kind,
                redis_url,
                tmp,
                f"handover{run}-b{i}",
                ctx.deadline,
                ctx.naive_mode,
                ctx.settings.max_connections(),
                ("ingest.mode=bridge",),
                ctx.checkouts.get(kind, ctx.checkouts["broker"]),
            )
            for i in range(n)
        ]
    fleet, errors = [], []
    for future in futures:
        try:
            server = future.result()
        except BenchError as exc:
            errors.append(str(exc))
            continue
        stack.callback(server.stop)
        fleet.append(server)
    if errors:
        raise BenchError("; ".join(errors))
    return fleet


def takeover_line(log: Path) -> tuple[int | None, bool]:
    """From a broker log: how many buffered messages its last takeover appended,
    and whether a hole marker went first."""
    found = TOOK.findall(log.read_text(errors="replace"))
    if not found:
        return None, False
    _, count, hole = found[-1]
    return int(count), bool(hole)


def handover_run(ctx: Context, kind: str, run: int) -> Result:
    """One run from a fresh redis-server; the counts of :func:`drive`'s clients."""
    tmp = ctx.tmp / f"handover-{run}"
    tmp.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        redis_server = RedisServer(tmp)
        stack.callback(redis_server.close)
        fleet = start_fleet(ctx, kind, redis_server.url, tmp, run, stack)
        out = asyncio.run(drive(ctx, fleet, redis_server.port))
        entries = int(redis_server.client.xlen(STREAM_KEY))
        followers: list[Follower] = out.pop("followers")
        sent: dict[str, list[int]] = out.pop("sent")
        tallies = [f.tally(sent) for f in followers]
        resets: Counter[str] = Counter()
        told: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        for f in followers:
            resets.update(f.resets)
            told.update(f.told)
            failures.update(f.failures)
        latencies = sorted(us for f in followers for us in f.latencies_us)
        new = out.get("new_leader")
        appended, hole = takeover_line(fleet[new].log) if new is not None else (None, False)
        return {
            "run": run + 1,
            "killed": out.get("killed"),
            "kill_at_s": out.get("kill_at_s"),
            "new_leader": new,
            "takeover_ms": out.get("takeover_ms"),
            "published": sum(len(v) for v in sent.values()),
            # beyond one entry per event and per end marker: appended twice
            "extra_entries": entries - sum(len(v) for v in sent.values()) - len(sent),
            "lost": sum(t["lost"] for t in tallies),
            "duplicated": sum(t["duplicated"] for t in tallies),
            "out_of_order": sum(t["out_of_order"] for t in tallies),
            "unexpected": sum(t["unexpected"] for t in tallies),
            "silent_lost": sum(
                t["lost"] for t, f in zip(tallies, followers, strict=True) if not f.resets
            ),
            "resets": sum(resets.values()),
            "reset_reasons": dict(resets),
            "reconnect_events": dict(told),
            "reconnects": sum(f.connects for f in followers) - len(followers),
            "stream_ends": sum(f.ends for f in followers),
            "connect_failures": dict(failures),
            "unfinished": sum(1 for f in followers if not f.finished),
            "holes": out["survivors"]["holes"],
            "takeovers": out["survivors"]["takeovers"],
            "appended_after_kill": out["survivors"]["appended"],
            "buffered_at_takeover": appended,
            "hole_at_takeover": hole,
            "longest_pause_ms": max(f.longest_pause for f in followers) * 1000,
            "p50_ms": percentile(latencies, 0.50) / 1000,
            "p99_ms": percentile(latencies, 0.99) / 1000,
            "max_ms": latencies[-1] / 1000 if latencies else None,
            "log_problems": sum(log_problems(b.log) for b in fleet),
            "logs": [str(b.log) for b in fleet],
        }


TOTALS = (
    "published",
    "lost",
    "duplicated",
    "out_of_order",
    "silent_lost",
    "resets",
    "holes",
    "extra_entries",
    "unexpected",
)


def handover(ctx: Context, kind: str) -> Result:
    s = ctx.settings
    runs: list[Result] = []
    for run in range(s.handover_runs):
        if ctx.deadline.left() <= 0:
            runs.append({"run": run + 1, "error": "time cap reached"})
            continue
        t = time.monotonic()
        try:
            runs.append(handover_run(ctx, kind, run))
        except (BenchError, OSError, redis.RedisError, aiohttp.ClientError) as exc:
            runs.append({"run": run + 1, "error": str(exc)})
            print(f"  run {run + 1} failed: {exc}", file=sys.stderr)
        r = runs[-1]
        print(
            f"  run {run + 1}: {time.monotonic() - t:.1f}s lost={r.get('lost')} "
            f"dup={r.get('duplicated')} resets={r.get('resets')} "
            f"takeover={fmt(r.get('takeover_ms'))}ms",
            file=sys.stderr,
            flush=True,
        )
    done = [r for r in runs if "error" not in r]
    takeovers = sorted(r["takeover_ms"] for r in done if r.get("takeover_ms") is not None)
    reasons: Counter[str] = Counter()
    for r in done:
        reasons.update(r["reset_reasons"])
    return {
        "runs": runs,
        "runs_completed": len(done),
        **{f"{key}_total": sum(r[key] for r in done) for key in TOTALS},
        "reset_reasons": dict(reasons),
        "unfinished_total": sum(r["unfinished"] for r in done),
        "runs_with_loss": sum(1 for r in done if r["lost"]),
        "takeover_min_ms": takeovers[0] if takeovers else None,
        "takeover_p50_ms": percentile(takeovers, 0.5) if takeovers else None,
        "takeover_max_ms": takeovers[-1] if takeovers else None,
        "no_takeover": sum(1 for r in done if r.get("takeover_ms") is None),
        "longest_pause_max_ms": max((r["longest_pause_ms"] for r in done), default=None),
        "log_problems_total": sum(r["log_problems"] for r in done),
    }


def summary_rows(r: Result, s: Settings) -> list[tuple[str, str, str, str]]:
    """(key, label, expect, better) of the totals table."""
    return [
        ("runs_completed", "runs completed", str(s.handover_runs), "higher"),
        ("published_total", "events published (all runs)", "", ""),
        ("lost_total", "events lost", "0", "lower"),
        ("runs_with_loss", "runs that lost events", "0", "lower"),
        ("duplicated_total", "events duplicated", "0", "lower"),
        ("out_of_order_total", "events out of order", "0", "lower"),
        ("unexpected_total", "events received not published on its channels", "0", "lower"),
        ("silent_lost_total", "lost by a client that got no broker.reset", "0", "lower"),
        ("resets_total", "broker.reset received", "0", "lower"),
        ("holes_total", "hole markers written (survivors' counter)", "0", "lower"),
        ("extra_entries_total", "stream entries beyond events + end markers", "0", "lower"),
        ("takeover_min_ms", "takeover ms (kill -> leader gauge 1), min", "", "lower"),
        ("takeover_p50_ms", "takeover ms, median", "", "lower"),
        ("takeover_max_ms", "takeover ms, max", "", "lower"),
        ("no_takeover", "runs where no survivor took over", "0", "lower"),
        ("longest_pause_max_ms", "longest pause a client saw ms, max", "", "lower"),
        ("unfinished_total", "clients without every end marker", "0", "lower"),
        ("log_problems_total", "broker log ERROR lines", "0", "lower"),
    ]


def reasons_text(reasons: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(reasons.items())) or "-"


def print_handover(r: Result, s: Settings) -> None:
    header = (
        "run",
        "killed",
        "at s",
        "takeover ms",
        "buffered",
        "published",
        "lost",
        "dup",
        "resets (reasons)",
        "holes",
        "reconnects",
        "pause ms",
        "lat p50/p99/max ms",
        "unfinished",
    )
    body = []
    for run in r["runs"]:
        if "error" in run:
            body.append((str(run["run"]), f"ERROR {run['error']}"[:60], *[""] * 12))
            continue
        buffered = fmt(run["buffered_at_takeover"]) + ("+hole" if run["hole_at_takeover"] else "")
        body.append(
            (
                str(run["run"]),
                f"b{run['killed']}->b{run['new_leader']}",
                f"{run['kill_at_s']:.2f}",
                fmt(run["takeover_ms"]),
                buffered,
                fmt(run["published"]),
                fmt(run["lost"]),
                fmt(run["duplicated"]),
                f"{run['resets']} ({reasons_text(run['reset_reasons'])})",
                fmt(run["holes"]),
                fmt(run["reconnects"]),
                fmt(run["longest_pause_ms"]),
                "/".join(fmt(run[k]) for k in ("p50_ms", "p99_ms", "max_ms")),
                fmt(run["unfinished"]),
            )
        )
    body.append(
        (
            "total",
            "",
            "",
            f"p50 {fmt(r['takeover_p50_ms'])}",
            "",
            fmt(r["published_total"]),
            fmt(r["lost_total"]),
            fmt(r["duplicated_total"]),
            f"{r['resets_total']} ({reasons_text(r['reset_reasons'])})",
            fmt(r["holes_total"]),
            "",
            fmt(r["longest_pause_max_ms"]),
            "",
            fmt(r["unfinished_total"]),
        )
    )
    print_grid(header, body, left=2)
    print(
        f"{s.handover_brokers} brokers (ingest.mode=bridge) on a fresh redis per run, "
        f"{s.handover_clients} clients x {s.handover_channels // s.handover_clients} of "
        f"{s.handover_channels} channels, {s.handover_rate:g} events/s for "
        f"{s.handover_seconds:g} s, leader SIGKILLed {s.handover_kill_after:g}-"
        f"{s.handover_kill_after + 1:g} s in (at s); "
        "buffered = messages the new leader appended from its buffer (its log)"
    )
    print()
    print_grid(
        ("handover", "metric", "value", "expect"),
        [
            ("handover", label, fmt(r.get(key)), expect)
            for key, label, expect, _ in summary_rows(r, s)
        ],
    )


def figures(r: Result, s: Settings) -> list[Figure]:
    return [(label, better, r.get(key)) for key, label, _, better in summary_rows(r, s)]


def problems(r: Result) -> list[str]:
    out = [f"handover/run {x['run']}: {x['error']}" for x in r["runs"] if "error" in x]
    for key, what in (
        ("duplicated_total", "events duplicated"),
        ("out_of_order_total", "events out of order"),
        ("unexpected_total", "events received on a channel they were not published on"),
        ("silent_lost_total", "events lost without a broker.reset"),
        ("unfinished_total", "clients never got every end marker"),
        ("no_takeover", "runs without a takeover"),
        ("extra_entries_total", "stream entries appended twice"),
    ):
        if r.get(key):
            out.append(f"handover: {r[key]} {what}")
    return out


SCENARIO = Scenario("handover", handover, report=print_handover, figures=figures, problems=problems)
