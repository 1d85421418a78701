"""Processes the bench starts and always stops: redis-server, clients (the servers
under test are started by ``targets.py`` and registered here too).

Everything started here is registered in :data:`STARTED` so that
:func:`kill_all` (from ``finally``, ``atexit`` and the hard-cap alarm) can
stop it, whatever state the run is in. Every wait takes a timeout.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import loadclient
import redis

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")

STARTED: list[subprocess.Popen[bytes] | multiprocessing.process.BaseProcess] = []


class BenchError(Exception):
    """A step of the bench failed or timed out; the message says which."""


class Deadline:
    """A point in time every wait is clipped to (the run's hard cap)."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self, want: float | None = None) -> float:
        left = max(0.0, self.at - time.monotonic())
        return left if want is None else min(want, left)

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise BenchError(f"time cap reached during {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_all() -> None:
    """Stop everything still running: SIGTERM, a short grace, then SIGKILL."""
    for p in STARTED:
        if isinstance(p, subprocess.Popen):
            if p.poll() is None:
                p.terminate()
        elif p.is_alive():
            p.terminate()
    grace = time.monotonic() + 3.0
    for p in STARTED:
        left = max(0.0, grace - time.monotonic())
        if isinstance(p, subprocess.Popen):
            try:
                p.wait(left)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(2)
        else:
            p.join(left)
            if p.is_alive():
                p.kill()
                p.join(2)
    STARTED.clear()


def stop(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(2)
    if proc in STARTED:
        STARTED.remove(proc)


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of ``pid``: ``/proc/<pid>/task/*/children``, else a scan of ppids."""
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids.extend(int(x) for x in (task / "children").read_text().split())
        return kids
    except OSError:  # no CONFIG_PROC_CHILDREN, or pid gone: the ppid field of every stat
        pass
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a ``server.workers`` supervisor and its workers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(children(p))
    return pids


def worker_admin_path(pid: int) -> str | None:
    """A broker worker's private admin socket, from ``SSE_BROKER_WORKER`` in its environment."""
    with contextlib.suppress(OSError):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"SSE_BROKER_WORKER="):
                return item.split(b"=", 1)[1].decode().split(":", 2)[2]
    return None


def unix_metrics(path: str, timeout: float = 2.0) -> dict[str, float]:
    """``GET /metrics`` over a Unix socket (a worker's admin listener), parsed like
    :meth:`targets.Server.metrics`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise BenchError(f"worker {path} /metrics: {head[:80]!r}")
    return parse_metrics(body)


def parse_metrics(body: bytes) -> dict[str, float]:
    """Every sample of a Prometheus exposition: ``name`` or ``name{labels}`` -> value."""
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def tcp_sockstat() -> dict[str, int]:
    """Host-wide TCP counters of ``/proc/net/sockstat`` (``mem`` in KiB, not pages).

    Kernel socket buffers are not in any process's RSS; this is where unsent
    bytes queued to clients that do not read show up. Every TCP socket of
    the network namespace counts, not only the bench's.
    """
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            stats = {k: int(v) for k, v in zip(fields[::2], fields[1::2], strict=True)}
            stats["mem"] *= PAGE_KIB
            return stats
    return {}


def runq_wait_seconds(pid: int) -> float:
    """Time ``pid`` spent runnable but waiting for a CPU (``/proc/<pid>/schedstat``).

    On a shared machine this says how much of a slow result was the server
    waiting for a core rather than working.
    """
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- redis -------------------------------------------------------------------------


class RedisServer:
    """A throwaway redis-server: no persistence, pub/sub output buffers unlimited."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(tmp),
                "--logfile", str(tmp / "redis.log"),
                "--maxclients", "18000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        STARTED.append(self.proc)
        self.client = redis.Redis(port=self.port, socket_timeout=10)
        until = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > until or self.proc.poll() is not None:
                    raise BenchError("redis-server did not start") from None
                time.sleep(0.05)
        # A reader that falls behind is disconnected at 32 MB by default: the
        # ingest scenario must measure the reader's rate, not that limit.
        self.client.config_set("client-output-buffer-limit", "pubsub 0 0 0")

    def version(self) -> str:
        return str(self.client.info("server")["redis_version"])

    def close(self) -> None:
        self.client.close()
        stop(self.proc)


# -- client processes -------------------------------------------------------------------


class ClientPool:
    """``k`` load-client processes, each holding its share of the streams."""

    def __init__(self, k: int, host: str, port: int, path: str = "/events") -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for _ in range(k):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=loadclient.worker_main, args=(child, host, port, path), daemon=True
            )
            proc.start()
            STARTED.append(proc)
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
        for reply in self._recv_all(30):
            if reply[0] != "hello":
                raise BenchError(f"client process said {reply!r}")

    def _recv_all(self, timeout: float) -> list[tuple[Any, ...]]:
        until = time.monotonic() + timeout
        replies = []
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            if not pipe.poll(max(0.0, until - time.monotonic())):
                raise BenchError(f"client process {proc.pid} did not answer in {timeout:.0f}s")
            try:
                replies.append(pipe.recv())
            except EOFError:
                raise BenchError(f"client process {proc.pid} exited") from None
        return replies

    def _ask(self, cmds: list[tuple[Any, ...]], timeout: float) -> list[tuple[Any, ...]]:
        for pipe, cmd in zip(self.pipes, cmds, strict=True):
            pipe.send(cmd)
        return self._recv_all(timeout)

    def connect(
        self, n: int, channel: str, *, concurrency: int, timeout: float, track: bool
    ) -> list[dict[str, Any]]:
        k = len(self.pipes)
        shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
        cmds = [("connect", s, channel, concurrency, timeout, track) for s in shares]
        return [r[1] for r in self._ask(cmds, timeout + 15)]

    def resume(
        self,
        n: int,
        channel: str,
        *,
        concurrency: int,
        timeout: float,
        reconnect: bool,
        retry_ms: int = 3000,
    ) -> list[dict[str, Any]]:
        """Open ``n`` browser-like resuming streams (see ``loadclient``)."""
        k = len(self.pipes)
        shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
        cmds = [("resume", s, channel, concurrency, timeout, reconnect, retry_ms) for s in shares]
        return [r[1] for r in self._ask(cmds, timeout + 15)]

    def status(self, timeout: float = 10) -> list[dict[str, Any]]:
        return [r[1] for r in self._ask([("status",)] * len(self.pipes), timeout)]

    def collect_resume(self, timeout: float = 30) -> list[dict[str, Any]]:
        return [r[1] for r in self._ask([("collect_resume",)] * len(self.pipes), timeout)]

    def expect(self, count: int) -> None:
        self._ask([("expect", count)] * len(self.pipes), 10)

    def collect(self, timeout: float) -> list[dict[str, Any]]:
        return [r[1] for r in self._ask([("collect", timeout)] * len(self.pipes), timeout + 30)]

    def close(self) -> None:
        """Close every stream and stop the processes (again: nothing)."""
        with contextlib.suppress(BenchError, OSError):
            self._ask([("close",)] * len(self.pipes), 10)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
            if proc in STARTED:
                STARTED.remove(proc)
        self.pipes, self.procs = [], []


def open_stalled(
    n: int, host: str, port: int, request: bytes, rcvbuf: int = 2048, timeout: float = 10
) -> list[socket.socket]:
    """``n`` clients that send their request and then never read a byte.

    ``SO_RCVBUF`` is set before ``connect`` so the advertised window stays
    tiny: the server's unsent bytes pile up at once. The caller closes them.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.sendall(request)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
