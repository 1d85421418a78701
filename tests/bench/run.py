"""Hot-path benchmark: the broker against a naive aiohttp broker, same machine, same run.

    python tests/bench/run.py [--quick] [--only idle,fanout,ingest,soak,drain,stalled,workers]
                              [--json out.json]
    python tests/bench/run.py --only hostile   # 10,000 hostile requests (not in the default run)
    python tests/bench/run.py --only bridge,handover  # bridge mode (not in the default run)
    python tests/bench/run.py --servers broker --compare-with /path/to/other/checkout

Starts its own redis-server, then for each scenario starts a fresh server
(the real broker, then the naive baseline from ``naive.py``), loads it with
the lean client of ``loadclient.py`` and prints one table of
broker / naive ratios. The lifecycle scenarios (``soak``, ``drain``,
``stalled``) and ``workers`` (the fan-out against ``server.workers`` 1 and 2)
run the broker alone and print their own tables, as do ``bridge`` (bridge
mode against stream mode) and ``handover`` (a bridge fleet's leader
SIGKILLed), which run only when named. The machine is
shared and noisy: compare ratios from one run, not absolute numbers across
runs. See README.md in this folder.

``--compare-with DIR`` also runs every scenario against the broker of another
checkout (``DIR/broker``, same Python, started right after this checkout's
broker) and prints a last table of new / old ratios, figure by figure, with
the figures where the old checkout was better by more than 5 %.

This file is the command line and the order of things; the scenarios are in
``scenarios/`` (and ``hostile.py``), the servers under test in ``targets.py``,
the tables in ``report.py``, the sizes in ``settings.py``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import procs
import redis
import report
import targets
from loadclient import raise_nofile
from procs import BenchError, Deadline, RedisServer
from scenarios import REGISTRY
from scenarios.ingest import READER_NOTE
from settings import BROKER_ONLY, COMPARED, DEFAULT, SCENARIOS, SERVERS, Settings
from targets import Context

Results = dict[str, dict[str, dict[str, Any]]]  # scenario -> server kind -> result


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], list[str], Settings]:
    """The options, the scenarios and servers to run, and the settings they run with."""
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
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one field of Settings (repeatable), e.g. stalled_event_bytes=2048",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--keep", type=Path, help="keep redis and server logs in a new folder under this one"
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        metavar="CHECKOUT",
        help="also run every scenario against the broker package of this other checkout "
        "(same Python) and print new / old ratios; needs broker in --servers",
    )
    args = parser.parse_args(argv)
    scenarios = [x for x in args.only.split(",") if x] or list(DEFAULT)
    servers = [x for x in args.servers.split(",") if x]
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    for name in servers:
        if name not in SERVERS:
            parser.error(f"unknown server {name!r}; known: {', '.join(SERVERS)}")
    if args.compare_with is not None:
        if "broker" not in servers:
            parser.error("--compare-with compares brokers: keep broker in --servers")
        try:
            args.compare_with = targets.broker_package(args.compare_with.resolve()).parent
        except BenchError as exc:
            parser.error(f"--compare-with: {exc}")

    settings = replace(Settings.pick(args.quick), connect_concurrency=args.connect_concurrency)
    for item in args.param:
        name, sep, value = item.partition("=")
        current = getattr(settings, name, None)
        if not sep or name not in Settings.__dataclass_fields__ or current is None:
            parser.error(f"--param {item!r}: expected NAME=VALUE with NAME a Settings field")
        # The declared type, not the default's: a float field may default to 50.
        declared = Settings.__dataclass_fields__[name].type
        declared_name = declared if isinstance(declared, str) else declared.__name__
        kind = {"int": int, "float": float, "str": str}.get(declared_name, type(current))
        try:
            settings = replace(settings, **{name: kind(value)})
        except ValueError:
            parser.error(f"--param {item!r}: not a {kind.__name__}")
    return args, scenarios, servers, settings


def kinds_for(scenario: str, servers: list[str], compare: bool) -> list[str]:
    """The servers a scenario runs against, in order; ``old`` right after ``broker``
    so that the two brokers see the most alike machine."""
    kinds = [k for k in servers if k == "broker"] if scenario in BROKER_ONLY else list(servers)
    if compare and "broker" in kinds:
        kinds.insert(kinds.index("broker") + 1, "old")
    return kinds


def run_all(
    ctx: Context, scenarios: list[str], servers: list[str], compare: bool, errors: list[str]
) -> Results:
    """Every scenario against each of its servers; failures become ``errors``."""
    raw: Results = {}
    for scenario in scenarios:
        raw[scenario] = {}
        kinds = kinds_for(scenario, servers, compare)
        if not kinds:
            errors.append(f"{scenario}: skipped, it runs the broker only")
        for kind in kinds:
            if ctx.deadline.left() <= 0:
                errors.append(f"{scenario}/{kind}: skipped, time cap reached")
                continue
            t = time.monotonic()
            print(f"{scenario} / {kind} ...", file=sys.stderr, flush=True)
            try:
                raw[scenario][kind] = REGISTRY[scenario].run(ctx, kind)
            except (BenchError, OSError, redis.RedisError) as exc:
                errors.append(f"{scenario}/{kind}: {exc}")
                print(f"  failed: {exc}", file=sys.stderr)
            print(f"  {time.monotonic() - t:.1f}s", file=sys.stderr)
    return raw


def print_results(
    scenarios: list[str], raw: Results, settings: Settings, errors: list[str]
) -> list[report.Row]:
    """The broker / naive table, then each broker-only scenario's own table;
    adds the problems the results call for to ``errors``. Returns the table's rows."""
    rows = [
        row
        for scenario in scenarios
        if scenario in COMPARED
        for row in report.rows_for(scenario, REGISTRY[scenario].metrics, raw.get(scenario, {}))
    ]
    if rows:
        print()
        report.print_table(rows)
        print("ratio = broker / naive")
        if "ingest" in raw and "naive" in raw["ingest"] and raw["ingest"]["naive"].get("source"):
            print(READER_NOTE)
    for scenario in scenarios:
        spec = REGISTRY[scenario]
        result = raw.get(scenario, {}).get("broker")
        if spec.report is not None and result is not None:
            print()
            spec.report(result, settings)
    for scenario in SCENARIOS:
        problems = REGISTRY[scenario].problems
        for kind, result in raw.get(scenario, {}).items():
            if problems is not None and kind in targets.BROKERS:
                tag = "" if kind == "broker" else f"[{kind}] "
                errors.extend(tag + p for p in problems(result))
    return rows


def comparison(scenarios: list[str], raw: Results, settings: Settings) -> list[report.Row]:
    """New / old rows of every scenario both brokers completed."""
    rows: list[report.Row] = []
    for scenario in scenarios:
        spec = REGISTRY[scenario]
        new, old = raw.get(scenario, {}).get("broker"), raw.get(scenario, {}).get("old")
        if new is not None and old is not None:
            figures = spec.figures_of(new, settings), spec.figures_of(old, settings)
            rows += report.compare_rows(scenario, *figures)
    return rows


def main(argv: list[str] | None = None) -> int:
    args, scenarios, servers, settings = parse_args(argv)
    compare = args.compare_with is not None
    cap = settings.cap_for(scenarios, 2 if compare else 1)
    raise_nofile()
    deadline = Deadline(cap)
    atexit.register(procs.kill_all)

    def hard_stop(signum: int, frame: FrameType | None) -> None:
        procs.kill_all()
        print("hard time cap reached: everything killed", file=sys.stderr)
        os._exit(2)

    signal.signal(signal.SIGALRM, hard_stop)
    signal.alarm(int(cap) + 30)

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
        info = report.machine_info(redis_server.version(), args.naive_mode)
        if compare:
            ctx.checkouts["old"] = args.compare_with
            info["compare_with"] = str(args.compare_with)
        print(
            f"cpus={info['cpus_usable']} (shared by server, clients, redis) "
            f"loadavg={info['loadavg_at_start'][0]:.2f} python={info['python']} "
            f"redis={info['redis_server']} naive={args.naive_mode} "
            f"{'quick' if args.quick else 'full'} cap={cap:.0f}s"
            + (f" old={args.compare_with}" if compare else ""),
            file=sys.stderr,
        )
        try:
            raw = run_all(ctx, scenarios, servers, compare, errors)
        finally:
            redis_server.close()
            procs.kill_all()
    signal.alarm(0)

    rows = print_results(scenarios, raw, settings, errors)
    compared = comparison(scenarios, raw, settings) if compare else None
    if compared is not None:
        print()
        report.print_comparison(compared, args.compare_with)
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    for err in errors:
        print(f"ERROR {err}")
    if args.json is not None:
        report.write_json(args.json, info, settings, raw, rows, errors, compared)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
