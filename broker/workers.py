"""``server.workers = N``: one supervisor, N worker processes, one listening socket.

The supervisor binds the public listener (or takes it from systemd socket
activation) and starts N ``sse-broker serve`` processes that inherit it: the
kernel spreads new connections across them. Each worker is a complete broker
(its own Redis subscription, history and limits — limits count per process)
with a private admin listener on a Unix socket. The supervisor serves the real
admin listener: ``/metrics`` sums the workers' samples (the equivalent of
prometheus-client's multiprocess mode), ``/readyz`` is 200 only when every
worker is ready, ``/publish`` goes to one worker and ``/admin/disconnect`` to
all. It restarts a worker that dies, forwards SIGHUP, and on SIGTERM drains
every worker at once (each spreads its closes over ``shutdown.drain_seconds``).

Workers are started with ``subprocess`` (fork + exec), not a bare fork of a
process that already runs an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from broker import systemd
from broker.admin import json_posts_only
from broker.config import ENV_WORKER, Config
from broker.guard import Guard, GuardedRunner
from broker.http import json_response
from broker.lifecycle import LISTEN_BACKLOG, Signals, bind

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0
WORKER_QUERY_TIMEOUT = 2.0
# Passed on to workers: they must not speak systemd's protocols themselves.
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
# Request headers an admin POST is forwarded to workers with (they check both too).
_FORWARDED = ("authorization", "content-type")


def merge_metrics(texts: Iterable[str]) -> list[Metric]:
    """Sum the samples of several Prometheus expositions, family by family.

    Counters, gauges and histogram buckets add up (``sse_broker_connections``
    is the total, ``sse_broker_redis_connected`` the number of connected
    workers); ``*_created`` timestamps take the earliest.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = defaultdict(dict)
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:  # the first worker's HELP/TYPE stand for all
                families[family.name] = Metric(family.name, family.documentation, family.type)
            bucket = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in bucket:
                    bucket[key] = sample.value
                elif sample.name.endswith("_created"):
                    bucket[key] = min(bucket[key], sample.value)
                else:
                    bucket[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class _Merged(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


class Supervisor:
    def __init__(self, cfg: Config, argv: list[str], public: socket.socket, rundir: str) -> None:
        self.cfg = cfg
        self.argv = argv
        self.public = public
        self.rundir = rundir
        self.n = cfg.server.workers
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._signals = Signals(self._on_stop, self._on_reload, self._kill_all)
        self._stopped = asyncio.Event()
        self._next_publish = 0

    def admin_path(self, index: int) -> str:
        return os.path.join(self.rundir, f"worker-{index}.sock")

    # -- the workers ------------------------------------------------------------------

    async def spawn(self, index: int) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        env[ENV_WORKER] = f"{index}:{self.public.fileno()}:{self.admin_path(index)}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            *self.argv,
            env=env,
            pass_fds=(self.public.fileno(),),
        )
        self.procs[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)

    async def watch(self, index: int) -> None:
        """Keep worker ``index`` running until the supervisor stops."""
        while True:
            proc = self.procs[index]
            code = await proc.wait()
            if self._stopped.is_set():
                return
            log.error("worker %d (pid %d) exited with %s; restarting", index, proc.pid, code)
            await asyncio.sleep(RESTART_DELAY)
            if self._stopped.is_set():
                return
            await self.spawn(index)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    # -- talking to workers' private admin listeners --------------------------------------

    async def ask(
        self,
        index: int,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        connector = aiohttp.UnixConnector(path=self.admin_path(index))
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=WORKER_QUERY_TIMEOUT)
            ) as session,
            session.request(method, f"http://worker{path}", data=body, headers=headers) as resp,
        ):
            return resp.status, await resp.read()

    async def ask_all(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> list[tuple[int, bytes] | None]:
        async def one(i: int) -> tuple[int, bytes] | None:
            try:
                return await self.ask(i, method, path, body, headers)
            except (aiohttp.ClientError, OSError, TimeoutError):
                return None

        return list(await asyncio.gather(*(one(i) for i in range(self.n))))

    # -- the admin listener ----------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        answers = await self.ask_all("GET", "/metrics")
        texts = [body.decode() for a in answers if a and a[0] == 200 for body in (a[1],)]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(merge_metrics(texts)))
        body = generate_latest(registry) + (
            b"# HELP sse_broker_workers_up Workers answering the supervisor.\n"
            b"# TYPE sse_broker_workers_up gauge\n"
            b"sse_broker_workers_up %d\n" % len(texts)
        )
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def readyz(self, request: web.Request) -> web.Response:
        if self._stopped.is_set():
            return json_response(503, {"status": "not_ready", "reason": "draining"})
        answers = await self.ask_all("GET", "/readyz")
        ready = sum(1 for a in answers if a and a[0] == 200)
        if ready == self.n:
            return json_response(200, {"status": "ready", "workers": ready})
        return json_response(
            503,
            {
                "status": "not_ready",
                "reason": "workers_not_ready",
                "ready": ready,
                "workers": self.n,
            },
            {"Retry-After": "1"},
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok", "workers": self.n})

    async def publish(self, request: web.Request) -> web.Response:
        # Any worker will do: publishing writes to Redis, every worker delivers.
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        for _ in range(self.n):
            index = self._next_publish % self.n
            self._next_publish += 1
            try:
                status, answer = await self.ask(index, "POST", "/publish", body, headers)
            except (aiohttp.ClientError, OSError, TimeoutError):
                continue
            return web.Response(status=status, body=answer, content_type="application/json")
        return json_response(503, {"error": "no_worker", "message": "no worker answered"})

    async def disconnect(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        answers = await self.ask_all("POST", "/admin/disconnect", body, headers)
        total = 0
        for answer in answers:
            if answer is None:
                continue
            status, raw = answer
            if status != 200:
                return web.Response(status=status, body=raw, content_type="application/json")
            total += int(orjson.loads(raw).get("disconnected", 0))
        return json_response(200, {"disconnected": total})

    def admin_app(self) -> web.Application:
        app = web.Application(middlewares=[json_posts_only])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_post("/publish", self.publish)
        app.router.add_post("/admin/disconnect", self.disconnect)
        return app

    # -- lifecycle --------------------------------------------------------------------------

    def _on_stop(self, name: str) -> None:
        log.info("signal %s: draining %d workers", name, self.n)
        self._stopped.set()
        systemd.notify("STOPPING=1", "STATUS=draining")
        self.signal_all(signal.SIGTERM)

    def _on_reload(self) -> None:
        self.signal_all(signal.SIGHUP)

    def _kill_all(self) -> None:
        log.warning("killing %d workers", self.n)
        self.signal_all(signal.SIGKILL)

    async def _announce_ready(self) -> None:
        while not self._stopped.is_set():
            answers = await self.ask_all("GET", "/readyz")
            if all(a and a[0] == 200 for a in answers):
                systemd.notify("READY=1", f"STATUS={self.n} workers listening and subscribed")
                log.info("all %d workers ready", self.n)
                return
            await asyncio.sleep(0.1)

    async def run(self, admin: socket.socket | None) -> int:
        self._signals.install()
        runner: web.AppRunner | None = None
        if admin is not None:
            guard = Guard(self.cfg.server.header_timeout_seconds)  # the header deadline only
            runner = GuardedRunner(
                self.admin_app(), guard, access_log=None, handler_cancellation=True
            )
            await runner.setup()
            await web.SockSite(runner, admin, backlog=LISTEN_BACKLOG).start()
        for i in range(self.n):
            await self.spawn(i)
        watchers = [asyncio.create_task(self.watch(i)) for i in range(self.n)]
        ready = asyncio.create_task(self._announce_ready())
        interval = systemd.watchdog_interval()
        pet: asyncio.Task[None] | None = None
        if interval:

            async def keep_petting() -> None:
                while True:
                    systemd.notify("WATCHDOG=1")
                    await asyncio.sleep(interval)

            pet = asyncio.create_task(keep_petting())
        await self._stopped.wait()
        # Every worker spreads its own drain over the window; then give them time to exit.
        grace = self.cfg.shutdown.drain_seconds + 10
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in self.procs.values()))
        except TimeoutError:
            log.warning("workers still running %ss after SIGTERM: killing them", grace)
            self.signal_all(signal.SIGKILL)
        for task in (*watchers, ready, *((pet,) if pet else ())):
            task.cancel()
        if runner is not None:
            await runner.cleanup()
        codes = [p.returncode for p in self.procs.values()]
        log.info("all workers stopped (exit codes %s)", codes)
        return 0


def supervise(cfg: Config, argv: list[str]) -> int:
    """Run ``server.workers`` workers under a supervisor; returns the exit code."""
    inherited = systemd.listen_sockets()
    public = inherited.get("public") or bind(cfg.server.listen_address)
    public.set_inheritable(True)
    admin = inherited.get("admin")
    if admin is None and cfg.admin.listen_address is not None:
        admin = bind(cfg.admin.listen_address)
    rundir = tempfile.mkdtemp(prefix="sse-broker-")
    try:
        return asyncio.run(Supervisor(cfg, argv, public, rundir).run(admin))
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
