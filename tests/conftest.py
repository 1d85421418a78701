"""Real-parts fixtures: a real ``redis-server``, real broker processes, real HTTP.

Fixtures (all function-scoped):

- ``redis_server`` -> ``RedisServer``: a private redis-server on a loopback port.
- ``redis_client`` -> ``redis.asyncio.Redis`` connected to it.
- ``start_broker`` -> ``async (*sets, env=None, config_text=None, wait_ready=True)
  -> BrokerProcess``: spawns ``python -m broker serve`` against ``redis_server``.
- ``broker`` -> ``BrokerProcess``: one broker started with defaults.
- ``broker_argv`` -> ``list[str]``: the command before ``serve`` (override to test
  the fixture itself).
- ``http`` / ``session`` -> the same ``aiohttp.ClientSession``.

Every process started here is killed at teardown. A failing test prints the
logs of its brokers (shown by pytest under "Captured stdout teardown").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Generator, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import redis.asyncio as aioredis
from helpers import metric_value
from yarl import URL

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 15.0
LOG_TAIL_CHARS = 12_000

# Variables of the outer environment that must not leak into a spawned broker:
# its own config, and systemd's notify/socket-activation protocol.
_ENV_DROP_PREFIXES = ("SSE_BROKER_",)
_ENV_DROP = {
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
}


# -- ports ---------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bind 127.0.0.1:0)."""
    return free_ports(1)[0]


def _tail(path: Path, limit: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "<no log file>"
    return text if len(text) <= limit else "...\n" + text[-limit:]


# -- failure reports, so teardown can print logs of failed tests -----------------

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


# -- redis-server ----------------------------------------------------------------


class RedisStartError(RuntimeError):
    pass


class RedisServer:
    """A redis-server process we own. ``stop()``/``start()`` keep the same port."""

    host = LOOPBACK

    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[aioredis.Redis] = []

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return _tail(self.log_path)

    def ping(self, timeout: float = 0.5) -> bool:
        """A raw-socket PING (no client library, no event loop)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, same port) and return once it answers PING."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                self.proc = None
                raise RedisStartError(
                    f"redis-server on port {self.port} exited at start:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise RedisStartError(
                    f"redis-server on port {self.port} did not answer PING in {timeout}s:\n"
                    f"{self.log_text()}"
                )
            time.sleep(0.005)

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill=True``) and wait for it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def client(self, **kwargs: Any) -> aioredis.Redis:
        """A new asyncio client on db 0; closed at teardown."""
        client = aioredis.Redis(host=self.host, port=self.port, db=0, **kwargs)
        self._clients.append(client)
        return client

    async def aclose(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        self._clients.clear()
        self.stop(kill=True)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A private redis-server on a free loopback port, killed at teardown."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: the tests need a real Redis "
            "(apt-get install redis-server)",
            pytrace=False,
        )
    server: RedisServer | None = None
    for attempt in range(3):
        server = RedisServer(binary, tmp_path / f"redis-{attempt}", free_port())
        try:
            server.start()
            break
        except RedisStartError:
            # The port may have been taken between free_port() and the bind.
            if attempt == 2 or "in use" not in server.log_text():
                raise
    assert server is not None
    try:
        yield server
    finally:
        await server.aclose()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> aioredis.Redis:
    """An asyncio client on ``redis_server``."""
    return redis_server.client()


# -- HTTP -----------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp session (30 s total timeout per request), closed at teardown."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
def session(http: aiohttp.ClientSession) -> aiohttp.ClientSession:
    """Alias of ``http``."""
    return http


# -- broker processes -------------------------------------------------------------


def _set_value(sets: Sequence[str], key: str) -> str | None:
    """The last ``--set key=value`` for ``key``, TOML string quotes removed."""
    found: str | None = None
    for item in sets:
        name, eq, value = item.partition("=")
        if eq and name.strip() == key:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            found = value
    return found


def _http_base(listen: str) -> str | None:
    """``http://host:port`` for a ``host:port`` listen value; None for unix/disabled."""
    if not listen or listen.startswith("unix:"):
        return None
    host, _, port = listen.rpartition(":")
    host = host or LOOPBACK
    if host in ("0.0.0.0", "::", "[::]"):
        host = LOOPBACK
    return f"http://{host}:{port}"


class BrokerProcess:
    """Handle on one spawned ``python -m broker serve``."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        *,
        argv: list[str],
        url: str | None,
        admin_url: str | None,
        path: str,
        log_path: Path,
        config_path: Path | None,
        session: aiohttp.ClientSession,
    ) -> None:
        self.proc = proc
        self.argv = argv
        self.url = url  # public base, e.g. http://127.0.0.1:P1
        self.admin_url = admin_url  # admin base; None when admin.listen = ""
        self.path = path  # server.path
        self.log_path = log_path
        self.config_path = config_path
        self._session = session

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def events_url(self, *channels: str, **params: str | int | Sequence[str]) -> str:
        """``<url><path>?channel=A&channel=B&k=v``; list values repeat the key."""
        if self.url is None:
            raise RuntimeError("the public listener is not on TCP")
        query: list[tuple[str, str]] = [("channel", c) for c in channels]
        for key, value in params.items():
            values = [value] if isinstance(value, str | int) else value
            query.extend((key, str(v)) for v in values)
        return str(URL(self.url + self.path).with_query(query))

    def log_text(self) -> str:
        """The process's stdout+stderr so far (the tail, when long)."""
        return _tail(self.log_path)

    def write_config(self, text: str) -> None:
        """Rewrite the ``--config`` file (then ``signal(SIGHUP)`` to reload)."""
        if self.config_path is None:
            raise RuntimeError("this broker was started without config_text")
        self.config_path.write_text(text)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the main process only."""
        self.proc.send_signal(sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def kill_group(self) -> None:
        """SIGKILL the process and anything it spawned (its own session), then reap."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    async def wait_exit(self, timeout: float = 15.0) -> int:
        """The exit code; ``TimeoutError`` (with the log) if still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"broker pid {self.pid} still running after {timeout}s\n"
                    f"--- broker log ---\n{self.log_text()}"
                )
            await asyncio.sleep(0.02)
        return code

    def _base(self, admin: bool) -> str:
        base = self.admin_url if admin else self.url
        if base is None:
            raise RuntimeError(f"no TCP {'admin' if admin else 'public'} listener")
        return base

    async def get(self, path: str, *, admin: bool = True, timeout: float = 5.0) -> tuple[int, str]:
        """GET ``path`` on the admin (default) or public listener: (status, body)."""
        async with self._session.get(
            self._base(admin) + path, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            return resp.status, await resp.text()

    async def metrics(self) -> str:
        """The admin ``/metrics`` text; fails the test unless it answers 200."""
        status, body = await self.get("/metrics")
        if status != 200:
            pytest.fail(f"/metrics answered {status}: {body[:500]}", pytrace=False)
        return body

    async def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample from ``/metrics`` (summed over matches; see ``helpers.metric_value``)."""
        return metric_value(await self.metrics(), name, labels)

    async def wait_status(
        self, path: str, status: int = 200, *, admin: bool = True, timeout: float = READY_TIMEOUT
    ) -> None:
        """Poll ``path`` until it answers ``status``; fail the test (with the log) otherwise."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            code = self.proc.poll()
            if code is not None:
                pytest.fail(
                    f"broker exited with code {code} before {path} answered {status}\n"
                    f"argv: {self.argv}\n--- broker log ---\n{self.log_text()}",
                    pytrace=False,
                )
            try:
                got, body = await self.get(path, admin=admin, timeout=1.0)
                if got == status:
                    return
                last = f"{got} {body[:300]!r}"
            except (aiohttp.ClientError, OSError) as exc:  # OSError covers TimeoutError
                last = repr(exc)
            if time.monotonic() > deadline:
                pytest.fail(
                    f"broker {path} did not answer {status} within {timeout}s "
                    f"(last: {last})\nargv: {self.argv}\n--- broker log ---\n{self.log_text()}",
                    pytrace=False,
                )
            await asyncio.sleep(0.02)

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until ``/readyz`` answers 200 (admin listener, else the public one)."""
        await self.wait_status("/readyz", 200, admin=self.admin_url is not None, timeout=timeout)

    async def wait_not_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until ``/readyz`` answers 503 (e.g. Redis is down, or draining)."""
        await self.wait_status("/readyz", 503, admin=self.admin_url is not None, timeout=timeout)


def spawn(
    argv: list[str], env: dict[str, str], log_path: Path, cwd: Path = REPO_ROOT
) -> subprocess.Popen[bytes]:
    """Start a process with stdout+stderr to ``log_path``, in its own session (so that
    teardown can kill it with everything it spawned, workers included)."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


class StartBroker(Protocol):
    async def __call__(
        self,
        *sets: str,
        env: dict[str, str] | None = None,
        config_text: str | None = None,
        wait_ready: bool | None = True,
    ) -> BrokerProcess: ...


@pytest.fixture
def broker_argv() -> list[str]:
    """The command that precedes ``serve``; a test module may override this fixture."""
    return [sys.executable, "-m", "broker"]


@pytest.fixture
async def start_broker(
    redis_server: RedisServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    broker_argv: list[str],
) -> AsyncIterator[StartBroker]:
    """Factory: ``await start_broker("sse.retry_ms=500", env=..., config_text=...)``.

    Runs ``<broker_argv> serve [--config F] --set server.listen=127.0.0.1:P1
    --set admin.listen=127.0.0.1:P2 --set redis.url=<redis_server.url> --set S...``
    (later ``--set`` win, so ``sets`` may override the listeners or the Redis URL;
    an ``SSE_BROKER_REDIS_URL`` in ``env`` suppresses the default ``redis.url``).
    ``wait_ready``: True polls ``/readyz`` until 200, False only ``/healthz``, None
    returns right after spawning; at most 15 s, then the test fails with the log.
    """
    handles: list[BrokerProcess] = []
    async with aiohttp.ClientSession() as client:

        async def start(
            *sets: str,
            env: dict[str, str] | None = None,
            config_text: str | None = None,
            wait_ready: bool | None = True,
        ) -> BrokerProcess:
            n = len(handles)
            public_port, admin_port = free_ports(2)
            argv = [*broker_argv, "serve"]
            config_path: Path | None = None
            if config_text is not None:
                config_path = tmp_path / f"broker-{n}.toml"
                config_path.write_text(config_text)
                argv += ["--config", str(config_path)]
            defaults = [
                f"server.listen={LOOPBACK}:{public_port}",
                f"admin.listen={LOOPBACK}:{admin_port}",
            ]
            if "SSE_BROKER_REDIS_URL" not in (env or {}):
                defaults.append(f"redis.url={redis_server.url}")
            all_sets = [*defaults, *sets]
            for item in all_sets:
                argv += ["--set", item]

            child_env = {
                k: v
                for k, v in os.environ.items()
                if k not in _ENV_DROP and not k.startswith(_ENV_DROP_PREFIXES)
            }
            child_env["PYTHONUNBUFFERED"] = "1"
            child_env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            )
            child_env.update(env or {})

            log_path = tmp_path / f"broker-{n}.log"
            proc = spawn(argv, child_env, log_path)
            handle = BrokerProcess(
                proc,
                argv=argv,
                url=_http_base(_set_value(all_sets, "server.listen") or ""),
                admin_url=_http_base(_set_value(all_sets, "admin.listen") or ""),
                path=_set_value(all_sets, "server.path") or "/events",
                log_path=log_path,
                config_path=config_path,
                session=client,
            )
            handles.append(handle)
            admin = handle.admin_url is not None
            if wait_ready is True:
                await handle.wait_status("/readyz", 200, admin=admin)
            elif wait_ready is False:
                await handle.wait_status("/healthz", 200, admin=admin)
            return handle

        try:
            yield start
        finally:
            for handle in handles:
                handle.kill_group()
            if _test_failed(request):
                for handle in handles:
                    print(f"\n--- broker pid {handle.pid} argv {handle.argv}")
                    print(handle.log_text())


@pytest.fixture
async def broker(start_broker: StartBroker) -> BrokerProcess:
    """A broker started with default settings, ready (``/readyz`` 200)."""
    return await start_broker()
