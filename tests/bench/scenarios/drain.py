"""(e) ``drain``: SIGTERM with thousands of open streams: when does each get
``broker.reconnect`` (drain)?"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from array import array

import loadclient
import procs
from procs import BenchError
from report import Expect, Figure, expect_figures, print_expect
from settings import Settings
from targets import Context

from scenarios.base import Result, Scenario
from scenarios.measure import log_problems, streams_connected, summed


def drain(ctx: Context, kind: str) -> Result:
    """SIGTERM with thousands of open streams: when does each get broker.reconnect (drain)?"""
    s = ctx.settings
    n = s.drain_conns
    window = s.drain_window_seconds
    with ctx.started(kind, "drain", (f"shutdown.drain_seconds={window}",)) as run:
        server = run.server
        pool = run.clients(n)
        results = pool.resume(
            n,
            "drain",
            concurrency=s.connect_concurrency,
            timeout=ctx.deadline.left(60),
            reconnect=False,  # they would come back on another instance
        )
        ok = streams_connected(results, n, "drain")
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
            raise BenchError(f"{kind} still running {window + 30}s after SIGTERM") from None
        t_exit = time.monotonic_ns()
        watcher.join(5)
        reader.join(5)
        time.sleep(0.5)  # the clients read the last closes
        final = pool.collect_resume()
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


def rows(r: Result, s: Settings) -> list[Expect]:
    """(key, label, expect, better) of the drain table."""
    n = r["streams"]
    window = s.drain_window_seconds
    return [
        ("streams", "streams open at SIGTERM", "", ""),
        ("drain_reconnects", "broker.reconnect (drain) received", f"{n:,}", ""),
        ("other_reconnects", "broker.reconnect, other reasons", "0", "lower"),
        ("closed_without_reconnect", "streams closed without broker.reconnect", "0", "lower"),
        ("not_closed", "streams never closed", "0", "lower"),
        ("not_ready_ms", "/readyz not 200 after SIGTERM ms", "~0", "lower"),
        ("first_ms", "first drain reconnect after SIGTERM ms", "~0", "lower"),
        ("last_ms", "last drain reconnect after SIGTERM ms", f"~{window * 1000:,}", ""),
        ("last_close_ms", "last stream close after SIGTERM ms", "", ""),
        ("buckets_in_window", f"100 ms buckets in the {window} s window", "", ""),
        ("nonempty_buckets", "  non-empty", str(r["buckets_in_window"]), "higher"),
        ("bucket_min", "  reconnects per bucket min", "", "higher"),
        ("bucket_max", "  reconnects per bucket max", "", "lower"),
        ("bucket_mean", "  reconnects per bucket mean", "", ""),
        ("bucket_even", "  perfectly even would be", "", ""),
        ("after_window", "reconnects after the window", "0", "lower"),
        ("exit_code", "exit code", "0", ""),
        ("drain_seconds", "SIGTERM to exit seconds", "", ""),
        ("server_cpu_pct", "server CPU % during the drain", "", "lower"),
        ("server_runq_pct", "server waiting for a CPU %", "~0", ""),
        ("loadavg_1m", "machine load average (1 min) at the end", "", ""),
        ("log_problems", "broker log ERROR lines", "0", "lower"),
    ]


def print_drain(r: Result, s: Settings) -> None:
    print_expect("drain", r, rows(r, s))
    print("\ndrain reconnects per 100 ms bucket, from SIGTERM (one line per second):")
    buckets = r["buckets"]
    for i in range(0, len(buckets), 10):
        print(f"  {i / 10:4.1f}s  " + " ".join(f"{c:4d}" for c in buckets[i : i + 10]))


def figures(r: Result, s: Settings) -> list[Figure]:
    return expect_figures(r, rows(r, s))


SCENARIO = Scenario("drain", drain, report=print_drain, figures=figures)
