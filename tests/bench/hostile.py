"""(h) ``hostile``: 10,000+ generated hostile requests against two brokers (issue 11).

The requests, the rules every answer must keep and the checks after each
batch are those of ``tests/test_hostile_requests.py`` (imported from there):
the same Hypothesis strategy, sent as raw bytes to its three brokers (jwt
behind a trusted proxy; stream mode; callback mode with the app down), in
batches of 50 (16 in flight).
Unlike the test, a broken rule does not stop the run: it is counted, and
the broken rules are printed grouped by kind, each with one exact request
(the culprits of tracebacks are searched in the first three batches that
log one).

Reported: requests sent and requests/s (sending and reading only, and over
the whole run with the checks between batches), time per request (p50, p99,
max, and the five slowest requests), the status histogram per broker and
the answers by JSON ``error`` code, broken rules, tracebacks and ERROR lines
in the brokers' logs (must be 0), each broker's RSS after the warm-up, every
1,000 requests and at the end, and ``sse_broker_connections`` at the end
(must be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from pathlib import Path
from typing import Any

import procs
from procs import BenchError
from report import Figure, print_grid
from scenarios.base import Result, Scenario
from settings import Settings
from targets import Context, Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the test module

import test_hostile_requests as fuzzing

BATCH = 50
IN_FLIGHT = 16


def _target(name: str, server: Server) -> fuzzing.Target:
    admin_port = int(server.metrics_url.rsplit(":", 1)[1].split("/", 1)[0])
    auth = "callback" if name == "callback" else "jwt"
    return fuzzing.Target(
        name, "127.0.0.1", server.port, admin_port, server.pid, server.log, auth=auth
    )


def _log_lines(path: Path) -> tuple[int, int]:
    """(tracebacks, ERROR lines) in a whole server log."""
    lines = path.read_text(errors="replace").splitlines()
    return (
        sum(1 for line in lines if fuzzing.is_traceback(line)),
        sum(1 for line in lines if fuzzing.is_error(line)),
    )


def group(failures: list[str]) -> dict[str, tuple[int, str]]:
    """Broken rules by kind (the message without numbers and bodies): (count, first one)."""
    groups: dict[str, tuple[int, str]] = {}
    for failure in failures:
        first = re.sub(r"^#\d+ to ", "", failure.split("\n", 1)[0])
        key = re.sub(r"\d{4,}", "N", re.split(r"; body |: b'|: b\"|\(status", first)[0])[:110]
        count, example = groups.get(key, (0, failure))
        groups[key] = (count + 1, example)
    return groups


def hostile(ctx: Context, kind: str) -> Result:
    """Send ``hostile_requests`` generated requests; collect what broke."""
    s = ctx.settings
    for i in range(3):  # stream ids from real times
        ctx.redis.client.xadd(fuzzing.STREAM_KEY, {"channel": "pub.warm", "data": str(i)})
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                ctx.started(kind, f"hostile-{mode}", fuzzing.broker_settings(mode))
            ).server
            for mode in fuzzing.MODES
        ]
        targets = [
            _target(mode, server) for mode, server in zip(fuzzing.MODES, servers, strict=True)
        ]
        for t in targets:
            t.epoch = asyncio.run(fuzzing.head_id(t))
            t.log_since()
        warm = asyncio.run(fuzzing.run_batch(targets, fuzzing.classics(len(targets))))
        rss_before = {t.name: procs.rss_kib(t.pid) for t in targets}
        batches = max(1, -(-s.hostile_requests // BATCH))
        started = time.monotonic()
        progress = {"n": 0}
        rss_timeline: list[tuple[int, ...]] = []

        def on_batch(result: fuzzing.BatchResult) -> None:
            progress["n"] += 1
            if progress["n"] % 20 == 0:  # every 1,000 requests
                sent = progress["n"] * BATCH
                rss_timeline.append((sent, *(procs.rss_kib(t.pid) for t in targets)))
                print(f"  {progress['n']}/{batches} batches", file=sys.stderr, flush=True)
            ctx.deadline.check("hostile")
            for server in servers:
                if not server.alive():
                    raise BenchError(f"a broker exited during the run; see {server.log}")

        stats = fuzzing.fuzz(
            targets,
            batches=batches,
            batch_size=BATCH,
            concurrency=IN_FLIGHT,
            fail_fast=False,
            on_batch=on_batch,
        )
        wall = time.monotonic() - started
        per_target: dict[str, Any] = {}
        for t, server in zip(targets, servers, strict=True):
            tracebacks, errors = _log_lines(server.log)
            statuses = {
                key.split()[1]: n for key, n in stats.statuses.items() if key.split()[0] == t.name
            }
            per_target[t.name] = {
                "statuses": dict(sorted(statuses.items())),
                "rss_before_kib": rss_before[t.name],
                "rss_after_kib": procs.rss_kib(t.pid),
                "connections_end": server.metric("sse_broker_connections"),
                "tracebacks": tracebacks,
                "error_lines": errors,
            }
        return {
            "requests": stats.sent,
            "warmup_requests": warm.sent,
            "batches": stats.batches,
            "send_seconds": stats.seconds,
            "wall_seconds": wall,
            "requests_per_s": stats.sent / stats.seconds if stats.seconds else None,
            "requests_per_s_wall": stats.sent / wall if wall else None,
            "latency_ms": {
                q: round(1000 * sorted(stats.latencies)[int(q * (len(stats.latencies) - 1))], 2)
                for q in (0.5, 0.99, 1.0)
            },
            "reasons": dict(stats.reasons.most_common()),
            "broken_rules": len(stats.failures) + len(warm.failures),
            "broken_by_kind": group(warm.failures + stats.failures),
            "rss_timeline": rss_timeline,
            "slowest": [f"{sec * 1000:.0f} ms: {text}" for sec, text in stats.slowest],
            "targets": per_target,
        }


def print_hostile(r: Result, s: Settings) -> None:
    names = list(r["targets"])
    rows: list[tuple[str, ...]] = []

    def row(label: str, key: str, expect: str = "") -> None:
        rows.append(("hostile", label, *(str(r["targets"][n][key]) for n in names), expect))

    row("tracebacks in the log", "tracebacks", "0")
    row("ERROR lines in the log", "error_lines", "0")
    row("sse_broker_connections at the end", "connections_end", "0")
    row("RSS after the warm-up KiB", "rss_before_kib")
    row("RSS at the end KiB", "rss_after_kib")
    rows.append(
        (
            "hostile",
            "RSS growth KiB",
            *(
                str(r["targets"][n]["rss_after_kib"] - r["targets"][n]["rss_before_kib"])
                for n in names
            ),
            "",
        )
    )
    statuses = sorted({k for n in names for k in r["targets"][n]["statuses"]})
    for status in statuses:
        rows.append(
            (
                "hostile",
                f"answers {status}",
                *(str(r["targets"][n]["statuses"].get(status, 0)) for n in names),
                "",
            )
        )
    print_grid(("hostile", "metric", *names, "expect"), rows)
    print(
        f"{r['requests']:,} generated requests (+{r['warmup_requests']} classic attacks first) "
        f"in {r['batches']} batches of {BATCH}, {IN_FLIGHT} in flight: "
        f"{r['requests_per_s']:,.0f} requests/s sending and reading, "
        f"{r['requests_per_s_wall']:,.0f}/s with the checks after each batch "
        f"({r['wall_seconds']:.1f} s); broken rules: {r['broken_rules']}"
    )
    lat = r["latency_ms"]
    print(
        f"time per request (connect to answer read) p50 {lat[0.5]} ms, p99 {lat[0.99]} ms, "
        f"max {lat[1.0]} ms"
    )
    print("answers by reason: " + ", ".join(f"{k} {v}" for k, v in r["reasons"].items()))
    for line in r["slowest"]:
        print(f"  slowest: {line[:300]}")
    print("RSS KiB after every 1,000 requests (" + " / ".join(names) + "):")
    print("  " + "  ".join(f"{n}: {'/'.join(map(str, rss))}" for n, *rss in r["rss_timeline"]))
    for key, (count, example) in r["broken_by_kind"].items():
        print(f"  {count:5d} x {key}\n        e.g. " + example.replace("\n", "\n        ")[:1500])


def figures(r: Result, s: Settings) -> list[Figure]:
    lat = r["latency_ms"]
    out: list[Figure] = [
        ("requests/s sending and reading", "higher", r["requests_per_s"]),
        ("requests/s with the checks", "higher", r["requests_per_s_wall"]),
        ("time per request p50 ms", "lower", lat[0.5]),
        ("time per request p99 ms", "lower", lat[0.99]),
        ("time per request max ms", "lower", lat[1.0]),
        ("broken rules", "lower", r["broken_rules"]),
    ]
    for name in fuzzing.MODES:
        t = r["targets"].get(name, {})
        out += [
            (f"{name}: tracebacks in the log", "lower", t.get("tracebacks")),
            (f"{name}: ERROR lines in the log", "lower", t.get("error_lines")),
            (f"{name}: connections at the end", "lower", t.get("connections_end")),
            (f"{name}: RSS at the end KiB", "lower", t.get("rss_after_kib")),
        ]
    return out


def problems(r: Result) -> list[str]:
    found = []
    if r["broken_rules"]:
        found.append(f"hostile: {r['broken_rules']} broken rules (listed above)")
    for name, t in r["targets"].items():
        if t["tracebacks"] or t["error_lines"] or t["connections_end"]:
            found.append(
                f"hostile/{name}: {t['tracebacks']} tracebacks, {t['error_lines']} ERROR "
                f"lines, {t['connections_end']:g} connections at the end"
            )
    return found


SCENARIO = Scenario("hostile", hostile, report=print_hostile, figures=figures, problems=problems)
