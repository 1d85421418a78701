"""systemd, spoken for real: the notify protocol over a real datagram socket,
socket activation with a real inherited listening socket, and the shipped units
through ``systemd-analyze verify``.

- notify: the test binds an ``AF_UNIX``/``SOCK_DGRAM`` socket (a path, and the
  abstract ``@name`` form) and starts the broker with ``NOTIFY_SOCKET`` pointing
  at it. ``SO_PASSCRED`` makes the kernel attach the sender's pid to every
  datagram, exactly what systemd checks for ``NotifyAccess=main``.
- ``WATCHDOG_PID`` / ``LISTEN_PID`` must name the broker's own pid, which is only
  known once it runs: the broker is started through a tiny ``python -c`` wrapper
  that puts its own pid in the environment and then ``exec``\\s the broker (same
  pid), as systemd does between fork and exec.
- socket activation: the test owns a listening TCP socket and hands it to the
  broker as fd 3 (``LISTEN_FDS=1``). While the broker is dead the test keeps the
  socket open, so new clients wait in the kernel backlog; the next broker serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import pytest
from conftest import (
    LOOPBACK,
    REPO_ROOT,
    BrokerProcess,
    RedisServer,
    StartBroker,
    free_ports,
)
from helpers import eventually, publish
from sse_client import SSEClient, SSEEvent, SSEStream, SSEStreamClosed

# Started as "<python> -c EXEC_AS_SELF serve ...": fills in the variables that must
# carry the broker's own pid, moves an inherited listening socket to fd 3, then
# exec()s the broker (the pid stays the same).
EXEC_AS_SELF = """
import os, sys
pid = str(os.getpid())
for key in ("WATCHDOG_PID", "LISTEN_PID"):
    if os.environ.get(key) == "self":
        os.environ[key] = pid
fd = os.environ.pop("TEST_LISTEN_FD", None)
if fd is not None and int(fd) != 3:
    os.dup2(int(fd), 3)
    os.close(int(fd))
os.execv(sys.executable, [sys.executable, "-m", "broker", *sys.argv[1:]])
"""

UNITS = REPO_ROOT / "systemd"


@pytest.fixture
def broker_argv() -> list[str]:
    """Every broker of this module starts through the exec wrapper."""
    return [sys.executable, "-c", EXEC_AS_SELF]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix socket paths (at most 107 bytes; tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="sse-sd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the notify socket -------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    at: float  # loop time of arrival
    pid: int  # the sender, from SCM_CREDENTIALS
    fields: dict[str, str]


class NotifySocket:
    """What systemd listens on: a datagram socket receiving ``KEY=value`` lines."""

    def __init__(self, address: str) -> None:
        self.address = address  # NOTIFY_SOCKET: a path, or "@name" (abstract)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.messages: list[Notification] = []
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        creds = struct.calcsize("3i")
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except BlockingIOError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:creds])[0]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.messages.append(Notification(self._loop.time(), pid, fields))

    def with_field(self, key: str, value: str | None = None) -> list[Notification]:
        return [
            m
            for m in self.messages
            if key in m.fields and (value is None or m.fields[key] == value)
        ]

    async def wait(self, key: str, value: str, *, count: int = 1, timeout: float = 10) -> None:
        await eventually(
            lambda: asyncio.sleep(0, len(self.with_field(key, value))),
            lambda n: n >= count,
            timeout=timeout,
        )

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


@contextlib.asynccontextmanager
async def notify_socket(address: str) -> AsyncIterator[NotifySocket]:
    sock = NotifySocket(address)
    try:
        yield sock
    finally:
        sock.close()


@contextlib.asynccontextmanager
async def open_stream(url: str, **kwargs: str) -> AsyncIterator[SSEStream]:
    """A 200 stream, once its preamble arrived (registered from then on)."""
    async with SSEClient.connect(url, **kwargs) as s:  # type: ignore[arg-type]
        assert s.status == 200, await s.text()
        await s.wait_for(lambda st: "ok" in st.parser.comments, what="the preamble")
        yield s


async def nothing_else_notified(
    notify: NotifySocket, broker: BrokerProcess, log_text: str, count: int, pets: int = 1
) -> None:
    """A fence for what the broker must not have notified (READY=1 while Redis is down):
    wait until its log shows ``log_text`` ``count`` times (e.g. that many failed
    subscribe attempts), then for ``pets`` more WATCHDOG=1. Datagrams from one process
    arrive in the order it sent them, so whatever it notified while getting that far
    is in ``notify.messages`` by then."""
    await eventually(
        lambda: asyncio.sleep(0, broker.log_text().count(log_text)), lambda n: n >= count
    )
    await notify.wait("WATCHDOG", "1", count=len(notify.with_field("WATCHDOG", "1")) + pets)


def keys_in_order(notify: NotifySocket) -> list[str]:
    """READY/STOPPING/WATCHDOG as they arrived (other fields left out)."""
    return [
        f"{k}={v}"
        for m in notify.messages
        for k, v in m.fields.items()
        if k in ("READY", "STOPPING", "WATCHDOG")
    ]


# -- notify ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_notify_ready_after_subscription_watchdog_and_stopping_before_exit(
    start_broker: StartBroker, redis_server: RedisServer, short_dir: Path
) -> None:
    redis_server.stop()
    async with notify_socket(str(short_dir / "notify")) as notify:
        broker = await start_broker(
            "shutdown.drain_seconds=1",
            env={
                "NOTIFY_SOCKET": notify.address,
                "WATCHDOG_USEC": "1000000",
                "WATCHDOG_PID": "self",
            },
            wait_ready=False,  # listening (healthz answers) but Redis is down
        )
        # five subscribe attempts failed (~1 s of backoff), and a pet after them
        await nothing_else_notified(notify, broker, "subscribe failed", 5)
        assert not notify.with_field("READY"), "READY=1 before the Redis subscription"
        # The watchdog does not wait for Redis: the loop is alive and says so.
        assert len(notify.with_field("WATCHDOG", "1")) >= 2, notify.messages

        redis_server.start()
        await notify.wait("READY", "1")
        ready = notify.with_field("READY", "1")[0]
        assert ready.pid == broker.pid
        assert ready.fields.get("STATUS") == "listening and subscribed"
        status, _ = await broker.get("/readyz")
        assert status == 200

        # WATCHDOG=1 every WATCHDOG_USEC/2 from the broker itself.
        before = len(notify.with_field("WATCHDOG", "1"))
        await asyncio.sleep(1.6)
        pets = notify.with_field("WATCHDOG", "1")
        assert len(pets) - before >= 2, pets
        assert {m.pid for m in pets} == {broker.pid}
        gaps = [b.at - a.at for a, b in itertools.pairwise(pets)]
        assert max(gaps[-3:]) < 0.9, gaps  # half the timeout, with slack for a busy machine

        # SIGTERM: STOPPING=1 as the drain starts, while the process still runs
        # (an open stream keeps the drain busy for shutdown.drain_seconds).
        async with open_stream(broker.events_url("news")) as s:
            broker.terminate()
            await notify.wait("STOPPING", "1", timeout=5)
            assert broker.returncode is None, "STOPPING=1 only arrived after the exit"
            event = await s.next_event(timeout=5)
            assert event.type == "broker.reconnect" and event.json()["reason"] == "drain"
        assert await broker.wait_exit() == 0
        order = [k for k in keys_in_order(notify) if k != "WATCHDOG=1"]
        assert order == ["READY=1", "STOPPING=1"], order
        assert {m.pid for m in notify.messages} == {broker.pid}


@pytest.mark.slow
async def test_notify_abstract_socket_and_watchdog_pid_of_another_process(
    start_broker: StartBroker,
) -> None:
    name = f"@sse-broker-test-{uuid.uuid4().hex}"
    async with notify_socket(name) as notify:
        # WATCHDOG_PID names another process: this one must not pet (systemd
        # sets it for the main pid; a child that inherited it stays silent).
        broker = await start_broker(
            env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
        )
        await notify.wait("READY", "1")
        await asyncio.sleep(0.5)  # 5 watchdog periods
        assert not notify.with_field("WATCHDOG"), notify.messages
        assert {m.pid for m in notify.messages} == {broker.pid}
        broker.terminate()
        assert await broker.wait_exit() == 0
        await notify.wait("STOPPING", "1", timeout=2)


@pytest.mark.slow
async def test_notify_with_workers_only_the_supervisor_speaks(
    start_broker: StartBroker, redis_server: RedisServer, short_dir: Path
) -> None:
    redis_server.stop()
    async with notify_socket(str(short_dir / "notify")) as notify:
        supervisor = await start_broker(
            "server.workers=2",
            "shutdown.drain_seconds=1",
            env={
                "NOTIFY_SOCKET": notify.address,
                "WATCHDOG_USEC": "1000000",
                "WATCHDOG_PID": "self",
            },
            wait_ready=False,
        )
        workers = await eventually(
            lambda: asyncio.sleep(0, children(supervisor.pid)), lambda c: len(c) == 2
        )
        # The workers failed to subscribe ten times between them (their log is shared),
        # then the supervisor pet twice (1 s, ten of its polls of the workers' /readyz):
        # a worker ready by then, and the READY=1 the supervisor would send for it, is in.
        await nothing_else_notified(notify, supervisor, "subscribe failed", 10, pets=2)
        assert not notify.with_field("READY"), "READY=1 while no worker is subscribed"
        status, body = await supervisor.get("/readyz")
        assert status == 503 and "workers_not_ready" in body, body

        redis_server.start()
        await notify.wait("READY", "1", timeout=15)
        # READY=1 came once every worker was ready: the supervisor's /readyz asks
        # every worker and must agree right away.
        status, body = await supervisor.get("/readyz")
        assert status == 200, body
        assert '"workers":2' in body.replace(" ", ""), body
        ready = notify.with_field("READY", "1")
        assert ready[0].fields.get("STATUS") == "2 workers listening and subscribed"

        supervisor.terminate()
        await notify.wait("STOPPING", "1", timeout=5)
        assert await supervisor.wait_exit() == 0
        for pid in workers:
            assert is_gone(pid), f"worker {pid} still running"

        senders = {m.pid for m in notify.messages}
        assert senders == {supervisor.pid}, (senders, supervisor.pid, workers)
        assert len(notify.with_field("READY", "1")) == 1
        assert len(notify.with_field("WATCHDOG", "1")) >= 3  # ~3 s of run at 0.5 s periods


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except FileNotFoundError:
        return []


def is_gone(pid: int) -> bool:
    """Exited (reaped, or a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


# -- socket activation ---------------------------------------------------------------------


class ActivatedBroker(BrokerProcess):
    decoy_port: int  # its server.listen, which it must not bind


class SpawnActivated(Protocol):
    def __call__(self, listener: socket.socket, *sets: str) -> Awaitable[ActivatedBroker]: ...


@pytest.fixture
async def spawn_activated(
    redis_server: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> AsyncIterator[SpawnActivated]:
    """Start ``python -m broker serve`` with ``listener`` as fd 3 and ``LISTEN_FDS=1``,
    as systemd does for ``sse-broker.socket`` (``FileDescriptorName=public``).

    ``server.listen`` is set to a port nobody listens on: a broker that binds it
    instead of using the inherited socket would not be reachable by the tests."""
    handles: list[ActivatedBroker] = []

    async def spawn(listener: socket.socket, *sets: str) -> ActivatedBroker:
        n = len(handles)
        decoy, admin = free_ports(2)
        argv = [sys.executable, "-c", EXEC_AS_SELF, "serve"]
        for item in (
            f"server.listen={LOOPBACK}:{decoy}",
            f"admin.listen={LOOPBACK}:{admin}",
            f"redis.url={redis_server.url}",
            *sets,
        ):
            argv += ["--set", item]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SSE_BROKER_", "LISTEN_", "NOTIFY_", "WATCHDOG_"))
        }
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(REPO_ROOT),
            LISTEN_FDS="1",
            LISTEN_PID="self",
            LISTEN_FDNAMES="public",
            TEST_LISTEN_FD=str(listener.fileno()),
        )
        log_path = tmp_path / f"activated-{n}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
                pass_fds=(listener.fileno(),),
                start_new_session=True,
            )
        port = listener.getsockname()[1]
        handle = ActivatedBroker(
            proc,
            argv=argv,
            url=f"http://{LOOPBACK}:{port}",
            admin_url=f"http://{LOOPBACK}:{admin}",
            path="/events",
            log_path=log_path,
            config_path=None,
            session=http,
        )
        handle.decoy_port = decoy
        handles.append(handle)
        return handle

    try:
        yield spawn
    finally:
        for handle in handles:
            handle.kill_group()
            print(f"\n--- activated broker pid {handle.pid}\n{handle.log_text()}")


def activation_socket() -> socket.socket:
    """What systemd's sse-broker.socket holds: a listening TCP socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    return sock


async def first_event_of_new_client(url: str, registered: asyncio.Event) -> SSEEvent:
    """A client that connects (while nobody may be accepting), then reads one event.

    ``registered`` is set once its preamble came (the broker registered the stream),
    or once it got anything else (so the test does not wait in vain)."""
    try:
        async with SSEClient.connect(url, timeout=30) as s:
            assert s.status == 200, await s.text()
            with contextlib.suppress(SSEStreamClosed, TimeoutError):
                await s.wait_for(
                    lambda st: "ok" in st.parser.comments or bool(st.pending),
                    timeout=15,
                    what="the preamble",
                )
            registered.set()
            return await s.next_event(timeout=10)
    finally:
        registered.set()


def accept_queue(listener: socket.socket) -> int:
    """Connections the kernel completed on ``listener`` that nobody accepted yet
    (the Recv-Q ``ss`` shows for a listening socket)."""
    port = listener.getsockname()[1]
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return sum(int(line.split()[1]) for line in out.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_socket_activation_restart_refuses_no_connection(
    workers: int, spawn_activated: SpawnActivated, redis_client, http: aiohttp.ClientSession
) -> None:
    listener = activation_socket()
    try:
        first = await spawn_activated(listener, f"server.workers={workers}")
        await first.wait_ready()
        assert "inherited socket" in first.log_text() or workers > 1
        assert "socket activation: public (fd 3)" in first.log_text()
        # It serves streams on the inherited socket, and did not bind server.listen.
        async with open_stream(first.events_url("news")) as s:
            await publish(redis_client, "news", "before the restart")
            assert (await s.next_event()).data == "before the restart"
        with pytest.raises(OSError):
            socket.create_connection((LOOPBACK, first.decoy_port), timeout=1).close()

        # The broker dies (a crash, or the stop half of a restart); systemd (here:
        # the test) keeps the socket. New clients connect meanwhile: the kernel
        # completes their handshakes and they wait, instead of being refused.
        first.kill_group()
        url = first.events_url("news")
        registered = [asyncio.Event() for _ in range(5)]
        waiting = [asyncio.create_task(first_event_of_new_client(url, r)) for r in registered]
        try:
            # The fence: all five handshakes completed and wait in the accept queue. A
            # refused or reset client never gets there; one there waits for an accept.
            await eventually(lambda: asyncio.sleep(0, accept_queue(listener)), lambda n: n >= 5)
            for task in waiting:
                assert not task.done(), task  # not refused, not reset: waiting
            with socket.create_connection(listener.getsockname(), timeout=1):
                pass  # a bare connect is accepted by the kernel too

            second = await spawn_activated(listener, f"server.workers={workers}")
            await second.wait_ready()
            async with asyncio.timeout(20):
                await asyncio.gather(*(r.wait() for r in registered))
            await publish(redis_client, "news", "after the restart")
            async with asyncio.timeout(10):
                got = await asyncio.gather(*waiting)
        finally:
            for task in waiting:
                task.cancel()
        # The clients that waited in the backlog get real streams, not a bounce
        # (the new broker accepts them once it can serve them).
        assert [(e.type, e.data) for e in got] == [("message", "after the restart")] * 5, got
        second.terminate()
        assert await second.wait_exit() == 0
    finally:
        listener.close()


@pytest.mark.slow
async def test_activated_broker_with_redis_down_answers_retryable_not_ready(
    spawn_activated: SpawnActivated, redis_server: RedisServer, redis_client
) -> None:
    """Redis stays down while an activated broker starts: clients are not held in
    the backlog forever; they get what the design says for "not ready", a 200
    with ``broker.reconnect`` (``not_ready``) that keeps an EventSource retrying."""
    listener = activation_socket()
    try:
        redis_server.stop()
        broker = await spawn_activated(listener)
        await broker.wait_status("/healthz", 200)
        async with SSEClient.connect(broker.events_url("news")) as s:
            assert s.status == 200
            event = await s.next_event()
            assert event.type == "broker.reconnect"
            assert event.json()["reason"] == "not_ready"
            assert s.parser.retry is not None
    finally:
        listener.close()


# -- systemd-analyze verify --------------------------------------------------------------------


def broker_command() -> str:
    """The real command of this environment, for ExecStart= (must be an executable)."""
    script = shutil.which("sse-broker")
    if script is None:
        candidate = Path(sys.executable).parent / "sse-broker"
        script = str(candidate) if candidate.exists() else None
    return f"{script} serve" if script else f"{sys.executable} -m broker serve"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is not installed (apt-get install systemd)"
    service = (UNITS / "sse-broker.service").read_text()
    socket_unit = (UNITS / "sse-broker.socket").read_text()
    # The shipped path is where `pip install` puts the script system-wide; here
    # it is wherever this environment has it.
    assert re.search(r"^ExecStart=/usr/local/bin/sse-broker serve ", service, re.M), service
    service = re.sub(
        r"^ExecStart=/usr/local/bin/sse-broker serve",
        lambda _: f"ExecStart={broker_command()}",
        service,
        flags=re.M,
    )
    (tmp_path / "sse-broker.service").write_text(service)
    (tmp_path / "sse-broker.socket").write_text(socket_unit)
    result = subprocess.run(
        [
            analyze,
            "verify",
            "--man=no",
            str(tmp_path / "sse-broker.socket"),
            str(tmp_path / "sse-broker.service"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    # Complaints about the host (no systemd running as pid 1 in a container, other
    # units on the system) are not ours; anything naming our units is.
    ours = [line for line in output.splitlines() if "sse-broker" in line]
    assert result.returncode == 0 and not ours, output

    # The settings the design asks for are there (verify only checks they parse).
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "KillMode=mixed",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "DynamicUser=yes",
        "ConfigurationDirectory=sse-broker",
        "Requires=sse-broker.socket",
    ):
        assert re.search(rf"^{re.escape(line)}$", service, re.M), line
    assert re.search(r"^RestrictAddressFamilies=.*AF_UNIX", service, re.M)
    assert int(re.search(r"^LimitNOFILE=(\d+)$", service, re.M).group(1)) >= 65536  # type: ignore[union-attr]
    watchdog = int(re.search(r"^WatchdogSec=(\d+)$", service, re.M).group(1))  # type: ignore[union-attr]
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", service, re.M).group(1))  # type: ignore[union-attr]
    # Above the default drain window (shutdown.drain_seconds = 10) plus closing time.
    assert stop > 10 + 5, stop
    assert watchdog >= 2
    assert "/etc/sse-broker/" in service
    assert re.search(r"^FileDescriptorName=public$", socket_unit, re.M)
    assert re.search(r"^Service=sse-broker.service$", socket_unit, re.M)
    assert re.search(r"^ListenStream=", socket_unit, re.M)


def test_the_service_user_can_read_its_config_as_installed(short_dir: Path) -> None:
    """The unit's user must be able to read /etc/sse-broker/broker.toml installed the
    way the unit's header says. systemd applies ConfigurationDirectoryMode= to
    /etc/sse-broker but, unlike the other *Directory= settings, never changes its
    owner (root:root); a DynamicUser= is in no group of root's. This lays out the
    same modes and owners in a scratch /etc and reads the file as such a user."""
    service = (UNITS / "sse-broker.service").read_text()
    install = re.search(
        r"install\b(?P<opts>[^\n]*?)\s+config/broker\.toml\s+/etc/sse-broker/broker\.toml",
        service,
    )
    assert install, "the unit's header no longer says how to install the config file"
    opts = install.group("opts").split()
    file_mode = int(opts[opts.index("-m") + 1], 8) if "-m" in opts else 0o755
    file_group = opts[opts.index("-g") + 1] if "-g" in opts else None
    mode = re.search(r"^ConfigurationDirectoryMode=(\d+)$", service, re.M)
    dir_mode = int(mode.group(1), 8) if mode else 0o755
    unit_group = re.search(r"^(?:Group|User)=(\S+)$", service, re.M)
    service_id = 61184  # the first DynamicUser= uid/gid; stands for Group= as well

    etc = short_dir / "etc"
    config_dir = etc / "sse-broker"
    config_dir.mkdir(parents=True)
    short_dir.chmod(0o755)
    etc.chmod(0o755)
    config_dir.chmod(dir_mode)
    config = config_dir / "broker.toml"
    config.write_text((REPO_ROOT / "config" / "broker.toml").read_text())
    config.chmod(file_mode)
    in_group = file_group is not None and unit_group is not None and file_group == unit_group[1]
    if in_group:
        os.chown(config, 0, service_id)
    what = (
        f"/etc/sse-broker root:root {dir_mode:04o}, broker.toml "
        f"root:{file_group or 'root'} {file_mode:04o}, service uid/gid {service_id}"
    )
    if os.geteuid() == 0:  # let the kernel decide, as it would for the service
        result = subprocess.run(
            ["cat", str(config)],
            user=service_id,
            group=service_id,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert result.returncode == 0, f"{what}: {result.stderr.strip()}"
    else:  # the same rule by hand: "other" bits, or group bits for the file's group
        assert dir_mode & 0o001, f"{what}: the directory cannot be entered"
        assert file_mode & (0o040 if in_group else 0o004), f"{what}: the file cannot be read"
