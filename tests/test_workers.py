"""``server.workers = N``: a supervisor and N real worker processes on one listening
socket, against a real redis-server.

The supervisor's admin listener is the public face (aggregated ``/metrics``,
``/readyz`` over every worker, ``/publish`` and ``/admin/disconnect``); each
worker also answers on its private admin Unix socket, found through
``/proc/<worker>/environ`` (``SSE_BROKER_WORKER=<index>:<fd>:<admin socket>``):
the tests compare the aggregate with what each worker says about itself.
Also: the public listener on a Unix socket (``server.listen = "unix:..."``), as
nginx on the same host uses it, with one and two workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jwt
import orjson
import pytest
from conftest import BrokerProcess, StartBroker
from helpers import envelope, eventually, metric_value, publish
from sse_client import SSEClient, SSEEvent, SSEStream

SECRET = "workers-test-secret-0123456789abcdef0123456789abcdef"
PUBLISH_KEY = "workers-publish-key-0123456789abcdef"
JSON = "application/json"  # every admin POST must say so
N_STREAMS = 200


# -- helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    index: int
    pid: int
    admin_path: str  # the worker's private admin listener (Unix socket)


def workers_of(supervisor: BrokerProcess) -> list[Worker]:
    """The live workers of ``supervisor``, by index."""
    found = []
    children = Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
    try:
        pids = [int(p) for p in children.read_text().split()]
    except (FileNotFoundError, ProcessLookupError):  # the supervisor itself is gone
        return []
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            # the worker exited (or was just killed) since the children were listed:
            # /proc/<pid> is gone, or still there with its environ unreadable (ESRCH)
            continue
        for item in environ:
            if item.startswith(b"SSE_BROKER_WORKER="):
                index, _, path = item.split(b"=", 1)[1].decode().split(":", 2)
                found.append(Worker(int(index), pid, path))
    return sorted(found, key=lambda w: w.index)


async def two_workers(supervisor: BrokerProcess) -> list[Worker]:
    return await eventually(
        lambda: asyncio.sleep(0, workers_of(supervisor)), lambda ws: len(ws) == 2, timeout=10
    )


async def ask_worker(worker: Worker, path: str) -> tuple[int, str]:
    """GET ``path`` on a worker's private admin socket."""
    connector = aiohttp.UnixConnector(path=worker.admin_path)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://worker{path}", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        return resp.status, await resp.text()


async def worker_metric(worker: Worker, name: str, labels: dict[str, str] | None = None) -> float:
    status, text = await ask_worker(worker, "/metrics")
    assert status == 200, text
    return metric_value(text, name, labels) or 0.0


def token(user: str) -> str:
    return jwt.encode(
        {"sub": user, "exp": int(time.time() + 600), "channels": ["news"]},
        SECRET,
        algorithm="HS256",
    )


@contextlib.asynccontextmanager
async def many_streams(urls: Sequence[str]) -> AsyncIterator[list[SSEStream]]:
    """Open every URL as a stream (concurrently, one TCP connection each); yield them
    once all preambles arrived."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        contextlib.AsyncExitStack() as stack,
    ):

        async def one(url: str) -> SSEStream:
            s = await stack.enter_async_context(SSEClient.connect(url, session=session))
            assert s.status == 200, await s.text()
            await s.wait_for(lambda st: "ok" in st.parser.comments, what="the preamble")
            return s

        yield list(await asyncio.gather(*(one(u) for u in urls)))


async def next_events(streams: Sequence[SSEStream], timeout: float = 10) -> list[SSEEvent]:
    return list(await asyncio.gather(*(s.next_event(timeout=timeout) for s in streams)))


def epoch(event: SSEEvent) -> str:
    return event.last_event_id.split("-")[0]


def full_log(broker: BrokerProcess) -> str:
    """The whole log (``log_text()`` is only its tail)."""
    return broker.log_path.read_text(errors="replace")


async def wait_log(broker: BrokerProcess, pattern: str, count: int, timeout: float = 10) -> str:
    return await eventually(
        lambda: asyncio.sleep(0, full_log(broker)),
        lambda text: len(re.findall(pattern, text)) >= count,
        timeout=timeout,
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix socket paths (tmp_path can pass the 107-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="sse-w-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- tests -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_two_workers_share_streams_publish_disconnect_and_drain(
    start_broker: StartBroker, redis_client, http: aiohttp.ClientSession
) -> None:
    supervisor = await start_broker(
        "server.workers=2",
        "limits.max_pending_connections_per_ip=0",  # 200 clients share one address here
        "shutdown.drain_seconds=1",
        "auth.mode=jwt",
        f"auth.jwt.secret={SECRET}",
        f'publish.keys=["{PUBLISH_KEY}"]',
    )
    workers = await two_workers(supervisor)
    assert len({w.pid for w in workers} | {supervisor.pid}) == 3
    users = ["u1" if i % 2 else "u2" for i in range(N_STREAMS)]
    urls = [supervisor.events_url("news", token=token(u)) for u in users]

    async with many_streams(urls) as streams:
        # The kernel spread the connections over both workers: the aggregate is
        # the sum of what each worker reports on its own admin socket.
        per_worker = [await worker_metric(w, "sse_broker_connections") for w in workers]
        text = await supervisor.metrics()
        assert metric_value(text, "sse_broker_connections") == N_STREAMS
        assert metric_value(text, "sse_broker_workers_up") == 2
        assert sum(per_worker) == N_STREAMS and min(per_worker) > 0, per_worker
        assert metric_value(text, "sse_broker_redis_connected") == 2  # one per worker

        # One PUBLISH reaches every stream once, whichever worker holds it (each
        # worker has its own subscription and its own epoch).
        await publish(redis_client, "news", envelope({"n": 1}, event="one"))
        first = await next_events(streams)
        assert {(e.type, e.data) for e in first} == {("one", '{"n":1}')}
        assert len({epoch(e) for e in first}) == 2, "ids of two worker processes"

        # POST /publish through the supervisor: one worker writes it to Redis,
        # every worker delivers it. The next event on every stream is this one:
        # nothing was delivered twice.
        async with http.post(
            supervisor.admin_url + "/publish",  # type: ignore[operator]
            data=orjson.dumps({"channel": "news", "event": "two", "data": {"n": 2}}),
            headers={"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": JSON},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["published"] == 1
        second = await next_events(streams)
        assert {(e.type, e.data) for e in second} == {("two", '{"n":2}')}
        async with http.post(
            supervisor.admin_url + "/publish",  # type: ignore[operator]
            data=b'{"channel": "news", "data": 3}',
            headers={"Authorization": "Bearer wrong-key", "Content-Type": JSON},
        ) as resp:
            assert resp.status == 401
        delivered = await supervisor.metric("sse_broker_events_delivered_total")
        assert delivered is not None and delivered >= 2 * N_STREAMS

        # POST /admin/disconnect goes to every worker: all of u1's streams end.
        async with http.post(
            supervisor.admin_url + "/admin/disconnect",  # type: ignore[operator]
            data=b'{"user": "u1"}',
            headers={"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": JSON},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"disconnected": N_STREAMS // 2}
        u1 = [s for s, u in zip(streams, users, strict=True) if u == "u1"]
        u2 = [s for s, u in zip(streams, users, strict=True) if u == "u2"]
        revoked = await next_events(u1)
        assert {(e.type, e.json()["reason"]) for e in revoked} == {("broker.reconnect", "revoked")}
        assert all(await asyncio.gather(*(s.wait_closed() for s in u1)))
        log = await wait_log(supervisor, r"admin disconnect user=u1 tenant=-: \d+", 2)
        closed = [int(n) for n in re.findall(r"admin disconnect user=u1 tenant=-: (\d+)", log)]
        assert len(closed) == 2 and sum(closed) == N_STREAMS // 2, closed
        assert min(closed) > 0, f"u1 had streams on both workers: {closed}"
        assert (
            await eventually(
                lambda: supervisor.metric("sse_broker_connections"),
                lambda v: v == N_STREAMS // 2,
            )
            == N_STREAMS // 2
        )

        # SIGTERM to the supervisor: it drains every worker at once, each stream
        # gets broker.reconnect (drain), and everything exits 0.
        supervisor.terminate()
        drained = await next_events(u2, timeout=10)
        assert {(e.type, e.json()["reason"]) for e in drained} == {("broker.reconnect", "drain")}
        assert all(await asyncio.gather(*(s.wait_closed() for s in u2)))
    assert await supervisor.wait_exit(timeout=15) == 0
    log = full_log(supervisor)
    assert len(re.findall(r"stream closed .*reason=drain", log)) == N_STREAMS // 2
    assert "all workers stopped (exit codes [0, 0])" in log, log[-2000:]


@pytest.mark.slow
async def test_readyz_needs_every_worker_and_a_killed_worker_is_restarted(
    start_broker: StartBroker, redis_client
) -> None:
    supervisor = await start_broker("server.workers=2")
    workers = await two_workers(supervisor)
    status, body = await supervisor.get("/readyz")
    assert status == 200 and orjson.loads(body)["workers"] == 2, body

    victim = workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    # Not ready while a worker is missing (one of two answers).
    await supervisor.wait_not_ready(timeout=5)
    status, body = await supervisor.get("/readyz")
    if status == 503:  # the replacement may already be up on a slow machine
        doc = orjson.loads(body)
        assert doc["reason"] == "workers_not_ready" and doc["workers"] == 2, doc

    # The supervisor starts a new worker 0 (new pid) and readiness comes back.
    replaced = await eventually(
        lambda: asyncio.sleep(0, workers_of(supervisor)),
        lambda ws: len(ws) == 2 and ws[0].pid != victim.pid,
        timeout=10,
    )
    await supervisor.wait_ready(timeout=10)
    assert replaced[1].pid == workers[1].pid, "the other worker kept running"
    assert f"worker 0 (pid {victim.pid}) exited with -9; restarting" in full_log(supervisor)
    assert await supervisor.metric("sse_broker_workers_up") == 2

    # The new worker serves streams on the same inherited socket.
    urls = [supervisor.events_url("news") for _ in range(40)]
    async with many_streams(urls) as streams:
        assert await worker_metric(replaced[0], "sse_broker_connections") > 0
        await publish(redis_client, "news", "after the restart")
        assert {e.data for e in await next_events(streams)} == {"after the restart"}


@pytest.mark.slow
async def test_sighup_is_forwarded_to_every_worker(start_broker: StartBroker, redis_client) -> None:
    supervisor = await start_broker("server.workers=2", config_text='[log]\nlevel = "info"\n')
    workers = await two_workers(supervisor)
    unmatched = "matches no open stream"
    ingested = "sse_broker_events_ingested_total"
    before = [await worker_metric(w, ingested) for w in workers]
    await publish(redis_client, "nobody-before", "x")
    # The fence: each worker counted the event. It counts and notes an unmatched
    # channel in one step, logging to its stderr synchronously, so a line it would
    # have written (at debug level) is in the log by the time its /metrics answers.
    for worker, count in zip(workers, before, strict=True):
        await eventually(lambda w=worker: worker_metric(w, ingested), lambda n, c=count: n > c)
    assert unmatched not in full_log(supervisor)

    supervisor.write_config('[log]\nlevel = "debug"\n')
    supervisor.signal(signal.SIGHUP)
    await wait_log(supervisor, "SIGHUP: configuration reloaded", 2)
    # Each worker now logs at debug level: each notes the unmatched channel once.
    await publish(redis_client, "nobody-after", "x")
    log = await wait_log(supervisor, rf"channel 'nobody-after' {unmatched}", 2)
    assert len(re.findall(rf"channel 'nobody-after' {unmatched}", log)) == 2
    assert "nobody-before" not in log
    status, _ = await supervisor.get("/readyz")
    assert status == 200  # the reload dropped nothing


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_unix_socket_listener(
    workers: int, start_broker: StartBroker, redis_client, short_dir: Path
) -> None:
    path = short_dir / "sse.sock"
    broker = await start_broker(f"server.listen=unix:{path}", f"server.workers={workers}")
    assert path.is_socket()
    connector = aiohttp.UnixConnector(path=str(path), limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get("http://localhost/healthz") as resp:
            assert resp.status == 200
        async with contextlib.AsyncExitStack() as stack:
            streams = []
            for i in range(10):
                s = await stack.enter_async_context(
                    SSEClient.connect(
                        "http://localhost/events?channel=news",
                        session=session,
                        # A peer on the Unix socket is a local proxy: its
                        # X-Forwarded-For is believed.
                        headers={"X-Forwarded-For": f"203.0.113.{i}"},
                    )
                )
                assert s.status == 200, await s.text()
                assert s.headers["Content-Type"] == "text/event-stream; charset=utf-8"
                await s.wait_for(lambda st: "ok" in st.parser.comments, what="the preamble")
                streams.append(s)
            await publish(redis_client, "news", "over a unix socket")
            assert {e.data for e in await next_events(streams)} == {"over a unix socket"}
    broker.terminate()
    assert await broker.wait_exit() == 0
    log = full_log(broker)
    assert "stream closed remote=203.0.113.3 " in log, log[-3000:]
