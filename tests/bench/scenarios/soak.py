"""(d) ``soak``: memory through repeated recycles; resumes must lose and duplicate nothing."""

from __future__ import annotations

import os
import sys
import time
from array import array
from collections import Counter
from typing import Any

import procs
from procs import BenchError
from report import Expect, Figure, expect_figures, fmt, print_expect, print_grid
from settings import Settings
from targets import Context

from scenarios.base import Result, Scenario
from scenarios.measure import (
    Publisher,
    Sampler,
    log_problems,
    percentile,
    streams_connected,
    summed,
)


def soak(ctx: Context, kind: str) -> Result:
    """Memory through repeated recycles; resumes must lose and duplicate nothing."""
    s = ctx.settings
    n = s.soak_conns
    flags = (
        f"sse.max_connection_age_seconds={s.soak_age_seconds}",
        f"sse.retry_ms={s.soak_retry_ms}",
    )
    with ctx.started(kind, "soak", flags) as run:
        server = run.server
        sampler = Sampler(server)
        run.defer(sampler.stop.set)
        time.sleep(1.0)
        rss_base = procs.rss_kib(server.pid)
        pool = run.clients(n)
        t_start = time.monotonic()
        results = pool.resume(
            n,
            "soak",
            concurrency=s.connect_concurrency,
            timeout=ctx.deadline.left(60),
            reconnect=True,
            retry_ms=s.soak_retry_ms,
        )
        ok = streams_connected(results, n, "soak")
        connect_seconds = time.monotonic() - t_start
        publisher = Publisher(ctx.redis.port, "sse:soak", s.soak_rate)
        run.defer(publisher.stop.set)
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
        time.sleep(s.settle_seconds)
        rss_closed = procs.rss_kib(server.pid)
        if not server.alive():
            raise BenchError(f"{kind} died during the soak; see {server.log}")
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
            g.update(reopen_percentiles(window))
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
            **reopen_percentiles(all_reopen),
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


def reopen_percentiles(ms: list[float]) -> dict[str, float | None]:
    """p50/p99/max of sorted reconnect times (None when there were none)."""
    return {
        "reopen_p50_ms": percentile(ms, 0.5) if ms else None,
        "reopen_p99_ms": percentile(ms, 0.99) if ms else None,
        "reopen_max_ms": ms[-1] if ms else None,
    }


def rows(r: Result, s: Settings) -> list[Expect]:
    """(key, label, expect, better) of the soak table."""
    n = r["streams"]
    return [
        ("streams", "streams (browser-like: resume with Last-Event-ID)", "", ""),
        ("generations_completed", "recycle generations completed", str(s.soak_generations), ""),
        ("published", f"events published ({s.soak_rate:g}/s, one channel)", "", ""),
        ("rss_baseline_kib", "RSS with 0 streams (baseline) KiB", "", "lower"),
        ("rss_connected_kib", "RSS after connect, before recycles KiB", "", "lower"),
        ("kib_per_stream_at_connect", "  = KiB per stream over baseline", "", "lower"),
        ("rss_after_kib", f"RSS after {r['generations_completed']} recycles KiB", "", "lower"),
        ("rss_growth_kib", "RSS growth across the recycles KiB", "~0", "lower"),
        ("growth_bytes_per_stream", "  = bytes per stream", "~0", "lower"),
        ("growth_after_gen1_kib", "RSS growth from recycle 1 to the last KiB", "~0", "lower"),
        ("history_growth_after_gen1_kib", "  replay history growth meanwhile KiB", "", ""),
        (
            "growth_bytes_per_later_recycle",
            "  net of history: bytes per later recycle",
            "~0",
            "lower",
        ),
        ("rss_peak_kib", "RSS peak during the soak KiB", "", "lower"),
        ("rss_closed_kib", "RSS 2 s after every stream closed KiB", "", "lower"),
        ("history_kib_end", "replay history at the end KiB (broker gauge)", "", ""),
        (
            "recycles",
            "broker.reconnect (recycle) received",
            f">= {s.soak_generations * n:,}",
            "",
        ),
        ("other_reconnects", "broker.reconnect, other reasons", "0", "lower"),
        ("refusals", "reconnects refused (soft 200 + broker.reconnect)", "0", "lower"),
        ("reopen_failures", "reconnect attempts failed", "0", "lower"),
        ("unexpected_closes", "streams closed without broker.reconnect", "0", "lower"),
        ("reopen_p50_ms", "reconnect: connect to preamble p50 ms", "", "lower"),
        ("reopen_p99_ms", "reconnect: connect to preamble p99 ms", "", "lower"),
        ("reopen_max_ms", "reconnect: connect to preamble max ms", "", "lower"),
        ("resets", "broker.reset received", "0", "lower"),
        ("lost", "events lost across resumes", "0", "lower"),
        ("duplicated", "events duplicated across resumes", "0", "lower"),
        ("missing_at_end", "events missing at the end", "0", "lower"),
        ("connect_seconds", "seconds to connect all", "", "lower"),
        ("soak_seconds", "soak seconds (first connect to last catch-up)", "", "lower"),
        ("server_cpu_pct", "server CPU % during the recycles", "", "lower"),
        ("server_runq_pct", "server waiting for a CPU % (runnable, not running)", "~0", ""),
        ("loadavg_1m", "machine load average (1 min) at the end", "", ""),
        ("log_problems", "broker log ERROR lines", "0", "lower"),
        (
            "log_problems_teardown",
            "  more once the clients closed (pending requests)",
            "0",
            "lower",
        ),
    ]


def print_soak(r: Result, s: Settings) -> None:
    print_expect("soak", r, rows(r, s))
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


def figures(r: Result, s: Settings) -> list[Figure]:
    return expect_figures(r, rows(r, s))


SCENARIO = Scenario("soak", soak, report=print_soak, figures=figures)
