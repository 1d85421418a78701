"""The servers under test: the broker of this checkout, the naive baseline, and
(``--compare-with``) the broker of another checkout, started the same way.

Each scenario starts a fresh server through :meth:`Context.server`; what it
passes is the ``kind``: ``broker``, ``naive`` or ``old``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import procs
from procs import REPO, BenchError, ClientPool, Deadline, RedisServer, http_get
from settings import Settings

NAIVE = Path(__file__).resolve().with_name("naive.py")
BROKERS = ("broker", "old")  # this checkout; the one given to --compare-with


@dataclass
class Server:
    """One server under test, started fresh for each scenario."""

    kind: str  # "broker" | "naive" | "old"
    proc: subprocess.Popen[bytes]
    port: int
    ready_url: str
    metrics_url: str
    ingest_metric: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self, timeout: float = 2.0) -> dict[str, float]:
        """Every sample of ``/metrics``: ``name`` or ``name{labels}`` -> value."""
        status, body = http_get(self.metrics_url, timeout)
        if status != 200:
            raise BenchError(f"{self.kind} /metrics answered {status}")
        return procs.parse_metrics(body)

    def metric(self, name: str, timeout: float = 2.0) -> float:
        """One sample of ``/metrics`` (BenchError when absent)."""
        value = self.metrics(timeout).get(name)
        if value is None:
            raise BenchError(f"{self.kind} /metrics has no {name}")
        return value

    def ingested(self) -> int:
        return int(self.metric(self.ingest_metric))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        procs.stop(self.proc)


def broker_env(checkout: Path) -> dict[str, str]:
    """The environment that makes ``python -m broker`` (run in ``checkout``) import
    the ``broker`` package of ``checkout``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))
    return env


def broker_package(checkout: Path) -> Path:
    """Where the ``broker`` package a server started from ``checkout`` comes from
    (BenchError when it is not inside ``checkout``)."""
    cmd = [sys.executable, "-c", "import broker; print(broker.__file__)"]
    try:
        out = subprocess.run(
            cmd, cwd=checkout, env=broker_env(checkout), capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"cannot import broker from {checkout}: {exc}") from None
    if out.returncode != 0:
        raise BenchError(f"cannot import broker from {checkout}: {out.stderr.decode()[-500:]}")
    package = Path(out.stdout.decode().strip()).resolve().parent
    if not package.is_relative_to(checkout.resolve()):
        raise BenchError(f"python imports broker from {package}, not from {checkout}")
    return package


def start_server(
    kind: str,
    redis_url: str,
    tmp: Path,
    tag: str,
    deadline: Deadline,
    naive_mode: str,
    max_conn: int,
    settings: Sequence[str] = (),
    checkout: Path = REPO,
) -> Server:
    """Start a server and wait until ready; ``settings`` are extra broker
    ``--set key=value`` flags, ``checkout`` the folder whose ``broker`` package runs."""
    port = procs.free_port()
    log = tmp / f"{kind}-{tag}.log"
    env = dict(os.environ)
    cwd = REPO
    if kind in BROKERS:
        admin = procs.free_port()
        cmd: Sequence[str] = [
            sys.executable, "-m", "broker", "serve",
            "--set", f"server.listen=127.0.0.1:{port}",
            "--set", f"admin.listen=127.0.0.1:{admin}",
            "--set", f"redis.url={redis_url}",
            "--set", f"limits.max_connections={max_conn}",
            # thousands of load clients share 127.0.0.1
            "--set", "limits.max_pending_connections_per_ip=0",
        ]  # fmt: skip
        cmd = [*cmd, *(arg for kv in settings for arg in ("--set", kv))]
        # -m puts the working directory first on sys.path: run in the checkout.
        env, cwd = broker_env(checkout), checkout
        base = f"http://127.0.0.1:{admin}"
        metric = "sse_broker_events_ingested_total"
    else:
        cmd = [
            sys.executable, str(NAIVE), "serve",
            "--listen", f"127.0.0.1:{port}", "--redis", redis_url, "--mode", naive_mode,
        ]  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        metric = "naive_events_ingested_total"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    procs.STARTED.append(proc)
    server = Server(kind, proc, port, f"{base}/readyz", f"{base}/metrics", metric, log)
    until = time.monotonic() + deadline.left(20)
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{kind} exited with {proc.returncode} at start; see {log}")
        try:
            if http_get(server.ready_url, 1.0)[0] == 200:
                return server
        except OSError:
            pass
        if time.monotonic() > until:
            server.stop()
            raise BenchError(f"{kind} not ready in time; see {log}")
        time.sleep(0.05)


@dataclass
class Context:
    """What every scenario gets: the settings, redis, the work dir and the deadline."""

    settings: Settings
    redis: RedisServer
    tmp: Path
    deadline: Deadline
    naive_mode: str
    checkouts: dict[str, Path] = field(default_factory=lambda: {"broker": REPO})

    def server(self, kind: str, tag: str, settings: Sequence[str] = ()) -> Server:
        return start_server(
            kind,
            self.redis.url,
            self.tmp,
            tag,
            self.deadline,
            self.naive_mode,
            self.settings.max_connections(),
            settings,
            self.checkouts.get(kind, REPO),
        )

    @contextlib.contextmanager
    def started(self, kind: str, tag: str, settings: Sequence[str] = ()) -> Iterator[Started]:
        """A fresh server (see :meth:`server`). On exit, what the scenario deferred
        and its client pools are closed, last opened first, then the server stops."""
        with contextlib.ExitStack() as stack:
            server = self.server(kind, tag, settings)
            stack.callback(server.stop)
            yield Started(server, stack)


@dataclass
class Started:
    """A server a scenario started, and what to close with it."""

    server: Server
    stack: contextlib.ExitStack

    def clients(self, n: int) -> ClientPool:
        """Client processes for ``n`` streams (two from 500 on), closed with the server."""
        pool = ClientPool(2 if n >= 500 else 1, "127.0.0.1", self.server.port)
        self.stack.callback(pool.close)
        return pool

    def defer(self, close: Callable[[], object]) -> None:
        """Call ``close`` when the scenario leaves, before its server stops."""
        self.stack.callback(close)
