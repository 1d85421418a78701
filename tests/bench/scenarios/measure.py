"""What the scenarios measure with: latency and completeness over the load
clients' reports, paced publishing, background samplers, server logs.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import procs
import redis
from procs import BenchError, Deadline
from report import Metric
from targets import Server

# The rows every delivery scenario reports from completeness(): all must be 0.
COMPLETENESS: list[Metric] = [
    ("missing_after_drain", "events missing after drain", "lower"),
    ("gaps", "gaps (lost mid-stream)", "lower"),
    ("out_of_order", "out of order / duplicate", "lower"),
]
# And, where the broker's streams and log are watched to the end:
END_CHECKS: list[Metric] = [
    ("streams_dropped", "streams closed by the broker", "lower"),
    ("incomplete_streams", "streams incomplete at the end", "lower"),
    ("log_problems", "broker log ERROR lines", "lower"),
]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[idx])


def deliveries(collected: list[dict[str, Any]]) -> Iterator[tuple[int, int]]:
    """(event seq, publish-to-receive us) of every delivery the load clients recorded."""
    for r in collected:
        arr, seqs = array("q"), array("q")
        arr.frombytes(r["latencies_us"])
        seqs.frombytes(r["seqs"])
        yield from zip(seqs, arr, strict=True)


def latency_summary(collected: list[dict[str, Any]], count: int) -> dict[str, float | None]:
    """Percentiles over all deliveries, and per event: first receiver and first-to-last spread."""
    lat: list[int] = []
    first = [2**62] * (count + 1)
    last = [-(2**62)] * (count + 1)
    for seq, us in deliveries(collected):
        lat.append(us)
        if 0 < seq <= count:
            first[seq] = min(first[seq], us)
            last[seq] = max(last[seq], us)
    lat.sort()
    seen = [i for i in range(1, count + 1) if last[i] >= first[i]]
    firsts = sorted(first[i] for i in seen)
    spreads = sorted(last[i] - first[i] for i in seen)
    return {
        "p50_ms": percentile(lat, 0.50) / 1000,
        "p99_ms": percentile(lat, 0.99) / 1000,
        "max_ms": lat[-1] / 1000 if lat else None,
        "first_p50_ms": percentile(firsts, 0.50) / 1000,
        "first_p99_ms": percentile(firsts, 0.99) / 1000,
        "spread_p50_ms": percentile(spreads, 0.50) / 1000,
        "spread_p99_ms": percentile(spreads, 0.99) / 1000,
    }


def completeness(collected: list[dict[str, Any]], first_ns: int) -> dict[str, Any]:
    """Deliveries/s since ``first_ns`` (the first publish) and what did not arrive in order."""
    received = sum(r["received_total"] for r in collected)
    last_ns = max(r["last_receive_ns"] for r in collected)
    span = (last_ns - first_ns) / 1e9 if last_ns else 0.0
    return {
        "delivered_per_s": received / span if span > 0 else None,
        "received": received,
        "missing_after_drain": sum(r["missing_total"] for r in collected),
        "gaps": sum(r["gaps_total"] for r in collected),
        "out_of_order": sum(r["disorder_total"] for r in collected),
        "dropped": sum(r["dropped"] for r in collected),
    }


def publish_paced(
    client: redis.Redis,
    channel: str,
    count: int,
    rate: float,
    deadline: Deadline,
    what: str,
    pad: str = "",
) -> tuple[int, float, float]:
    """PUBLISH ``{"data": "<seq>:<time_ns><pad>"}`` for seq 1..``count`` at ``rate``/s.

    Returns the wall clock of the start (ns), its monotonic time and the
    seconds publishing took.
    """
    first_ns = time.time_ns()
    t0 = time.monotonic()
    for i in range(count):
        deadline.check(what)
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        client.publish(channel, orjson.dumps({"data": f"{i + 1}:{time.time_ns()}{pad}"}))
    return first_ns, t0, time.monotonic() - t0


def streams_connected(
    results: list[dict[str, Any]], wanted: int, who: str, noun: str = "streams"
) -> int:
    """How many of ``wanted`` streams connected (BenchError when none did; a warning
    on stderr when some did not)."""
    ok = int(sum(r["ok"] for r in results))
    if ok < wanted:
        errors = [r["errors"] for r in results if r["errors"]]
        if not ok:
            raise BenchError(f"no stream connected: {errors}")
        print(f"  {who}: only {ok}/{wanted} {noun} connected: {errors}", file=sys.stderr)
    return ok


def log_problems(path: Path) -> int:
    """ERROR/CRITICAL lines in a server log, and tracebacks no such line introduced."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return -1
    logged = sum(1 for line in lines if " ERROR " in line or " CRITICAL " in line)
    bare = sum(
        1
        for before, line in zip(["", *lines], lines, strict=False)
        if line.startswith("Traceback") and " ERROR " not in before
    )
    return logged + bare


def summed(statuses: list[dict[str, Any]], key: str, sub: str | None = None) -> int:
    if sub is None:
        return sum(int(st[key]) for st in statuses)
    return sum(int(st[key].get(sub, 0)) for st in statuses)


# -- background threads ---------------------------------------------------------------------


class Periodic(threading.Thread):
    """Calls :meth:`tick` every ``interval`` seconds until ``stop`` is set."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.stop = threading.Event()

    def tick(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stop.is_set():
            self.tick()
            self.stop.wait(self.interval)


class Sampler(Periodic):
    """Every 100 ms: the server's RSS and, when ``metric`` is given, that sample of /metrics."""

    def __init__(self, server: Server, metric: str | None = None) -> None:
        super().__init__(0.1)
        self.server = server
        self.metric = metric
        self.samples: list[tuple[float, int, float | None]] = []  # (monotonic, KiB, value)
        self.tcp_mem_kib: list[int] = []  # host-wide kernel TCP buffers

    def tick(self) -> None:
        value = None
        with contextlib.suppress(OSError, BenchError):
            rss = procs.rss_kib(self.server.pid)
            if self.metric is not None:
                value = self.server.metrics(1.0).get(self.metric)
            self.samples.append((time.monotonic(), rss, value))
            self.tcp_mem_kib.append(procs.tcp_sockstat().get("mem", 0))

    def peak_kib(self) -> int | None:
        return max((s[1] for s in self.samples), default=None)

    def first_reaching(self, value: float) -> float | None:
        """Monotonic time of the first sample whose metric value is >= ``value``."""
        return next((t for t, _, v in self.samples if v is not None and v >= value), None)


class TreeRss(Periodic):
    """Every 200 ms: the summed RSS of a process and its descendants; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(0.2)
        self.pid = pid
        self.peak_kib = 0

    def tick(self) -> None:
        total = 0
        for p in procs.tree(self.pid):
            with contextlib.suppress(OSError, BenchError):
                total += procs.rss_kib(p)
        self.peak_kib = max(self.peak_kib, total)


class Publisher(threading.Thread):
    """PUBLISH ``{"data": "<seq>:<time_ns>"}`` on ``channel`` at ``rate``/s until stopped."""

    def __init__(self, port: int, channel: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis(port=port, socket_timeout=10)
        self.channel = channel
        self.rate = rate
        self.published = 0
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            while not self.stop.is_set():
                delay = t0 + self.published / self.rate - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    break
                payload = orjson.dumps({"data": f"{self.published + 1}:{time.time_ns()}"})
                self.client.publish(self.channel, payload)
                self.published += 1
        except redis.RedisError as exc:
            self.error = exc
        finally:
            self.client.close()

    def finish(self) -> int:
        self.stop.set()
        self.join(15)
        if self.error is not None:
            raise BenchError(f"publisher failed: {self.error}")
        return self.published
