"""Redis as production runs it: Sentinel failover, TLS, ACL users and password files.

Everything is real: ``redis-server`` masters and replicas, ``redis-sentinel``
(quorum 1, ``down-after-milliseconds 1000``, ``failover-timeout 3000``), a TLS
``redis-server`` (``--tls-port``, ``--port 0``) with a CA and certificates made
here, and ACL users created with ``ACL SETUSER``. The broker is a real process
(``start_broker``) pointed at them through ``redis.url`` / ``redis.sentinels`` /
``redis.password_file``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import LOOPBACK, BrokerProcess, RedisServer, StartBroker, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import envelope, eventually, publish, stream

MASTER = "mymaster"
PUBLISH_KEY = "redis-prod-publish-key-0123456789"


# -- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    """A redis-server or redis-sentinel process of this test."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    ssl_context: ssl.SSLContext | None = None

    def ping(self) -> bool:
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(socket.create_connection((LOOPBACK, self.port), 0.5))
                if self.ssl_context is not None:
                    sock = stack.enter_context(
                        self.ssl_context.wrap_socket(sock, server_hostname=LOOPBACK)
                    )
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@dataclass
class Procs:
    workdir: Path
    started: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], port: int, **kw: ssl.SSLContext) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        handle = Proc(name, port, proc, log, kw.get("ssl_context"))
        self.started.append(handle)
        deadline = time.monotonic() + 10
        while not handle.ping():
            assert proc.poll() is None, f"{name} exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{name} does not answer:\n{log.read_text()}"
            time.sleep(0.01)
        return handle

    def redis(self, name: str, *args: str, port: int | None = None, **kw: ssl.SSLContext) -> Proc:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        port = port or free_port()
        data = self.workdir / name
        data.mkdir(exist_ok=True)
        argv = [
            binary, "--port", str(port), "--bind", LOOPBACK, "--save", "",
            "--appendonly", "no", "--dir", str(data), *args,
        ]  # fmt: skip
        return self.spawn(name, argv, port, **kw)

    def sentinel(self, name: str, master_port: int) -> Proc:
        binary = shutil.which("redis-sentinel")
        assert binary, "redis-sentinel is not installed (apt-get install redis-sentinel)"
        port = free_port()
        conf = self.workdir / f"{name}.conf"  # Sentinel rewrites its own config file
        conf.write_text(
            f"port {port}\nbind {LOOPBACK}\ndir {self.workdir}\n"
            f"sentinel monitor {MASTER} {LOOPBACK} {master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 3000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        return self.spawn(name, [binary, str(conf)], port)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} (port {p.port})\n{p.log.read_text(errors='replace')[-3000:]}"
            for p in self.started
        )


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    handle = Procs(tmp_path)
    try:
        yield handle
    finally:
        for p in handle.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, signal.SIGKILL)
            p.proc.wait()
        print(handle.logs())


@contextlib.asynccontextmanager
async def client(port: int, **kwargs: object) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis(host=LOOPBACK, port=port, **kwargs)  # type: ignore[arg-type]
    try:
        yield c
    finally:
        await c.aclose()


async def wait_log(broker: BrokerProcess, pattern: str, timeout: float = 10) -> str:
    return await eventually(
        lambda: asyncio.sleep(0, broker.log_path.read_text(errors="replace")),
        lambda text: re.search(pattern, text) is not None,
        timeout=timeout,
    )


# -- Sentinel ----------------------------------------------------------------------------


@dataclass
class SentinelSetup:
    master: Proc
    replica: Proc
    sentinel: Proc
    dead_sentinel_port: int

    def broker_sets(self, *, dead_sentinel_first: bool = False) -> tuple[str, ...]:
        """``--set``s for a broker following this Sentinel. ``redis.url`` points
        nowhere: with Sentinel it only names the database."""
        sentinels = [f'"{LOOPBACK}:{self.sentinel.port}"']
        if dead_sentinel_first:  # one of the sentinels is down (maintenance, a dead host)
            sentinels.insert(0, f'"{LOOPBACK}:{self.dead_sentinel_port}"')
        return (
            f"redis.sentinels=[{', '.join(sentinels)}]",
            f"redis.sentinel_master={MASTER}",
            f"redis.url=redis://{LOOPBACK}:1/0",
        )

    async def master_port(self) -> int:
        async with client(self.sentinel.port, decode_responses=True) as s:
            _, port = await s.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
            return int(port)

    async def fail_over(self) -> None:
        """kill -9 the master; return once Sentinel promoted the replica."""
        self.master.kill()
        await eventually(self.master_port, lambda p: p == self.replica.port, timeout=20)
        async with client(self.replica.port, decode_responses=True) as r:
            await eventually(lambda: r.execute_command("ROLE"), lambda role: role[0] == "master")


@pytest.fixture
async def sentinel_setup(procs: Procs) -> SentinelSetup:
    # No 5 s wait before the first (diskless) full sync of the replica.
    master = procs.redis("master", "--repl-diskless-sync-delay", "0")
    replica = procs.redis("replica", "--replicaof", LOOPBACK, str(master.port))
    async with client(replica.port, decode_responses=True) as r:
        await eventually(r.info, lambda info: info.get("master_link_status") == "up", timeout=10)
    sentinel = procs.sentinel("sentinel", master.port)
    # Sentinel learns the replica from the master's INFO; wait until it would
    # pick it for a failover.
    async with client(sentinel.port, decode_responses=True) as s:

        async def replicas() -> list[dict[str, str]]:
            raw = await s.execute_command("SENTINEL", "replicas", MASTER)
            return [
                dict(zip(r[::2], r[1::2], strict=True)) if isinstance(r, list) else r for r in raw
            ]

        await eventually(
            replicas,
            lambda rs: any(
                r.get("port") == str(replica.port) and r.get("flags") == "slave" for r in rs
            ),
            timeout=15,
        )
    return SentinelSetup(master, replica, sentinel, free_port())


@pytest.mark.slow
async def test_sentinel_failover_pubsub_resets_open_streams_and_delivers_again(
    start_broker: StartBroker, sentinel_setup: SentinelSetup
) -> None:
    """kill -9 the master: Sentinel promotes the replica within ~2.5 s. Meanwhile the
    broker keeps asking Sentinel for the master; for about a second Sentinel
    answers that there is none (the old one is down, the new one not promoted
    yet). The broker must ride that out and follow the new master."""
    setup = sentinel_setup
    broker = await start_broker(*setup.broker_sets())
    assert re.search(
        rf"subscribed to sse:\* on sentinel {MASTER}@{LOOPBACK}:{setup.sentinel.port}/0",
        broker.log_text(),
    ), broker.log_text()
    async with client(setup.master.port) as master, stream(broker, "news") as s:
        await publish(master, "news", envelope("before"))
        before = await s.next_event()
        assert before.data == "before"

        await setup.fail_over()
        # The broker follows the new master: ready again, and the open stream is
        # told that events may have been lost meanwhile (pub/sub keeps none).
        await broker.wait_ready(timeout=15)
        reset = await s.next_event(timeout=10)
        assert reset.type == "broker.reset", reset
        assert reset.json()["reason"] == "outage"
        async with client(setup.replica.port) as new_master:
            await publish(new_master, "news", envelope("after"))
            after = await s.next_event(timeout=5)
            assert after.data == "after"
            # A resume from before the failover cannot be exact in pub/sub mode.
            async with stream(broker, "news", last_event_id=before.last_event_id) as r:
                first = await r.next_event()
                assert (first.type, first.json()["reason"]) == ("broker.reset", "outage")
    # The command client (canary, /publish) follows too: the ingest is not
    # declared stalled after the failover.
    await asyncio.sleep(2.5)
    assert await broker.metric("sse_broker_ingest_stalled") == 0
    status, _ = await broker.get("/readyz")
    assert status == 200


def flags(info: dict[str, str] | list[str]) -> str:
    """The ``flags`` of a ``SENTINEL MASTER`` answer (a dict, or a flat list)."""
    if isinstance(info, list):
        info = dict(zip(info[::2], info[1::2], strict=True))
    return info["flags"]


@pytest.mark.slow
async def test_sentinel_without_a_master_for_a_while_the_broker_keeps_asking(
    start_broker: StartBroker, procs: Procs
) -> None:
    """The window of a failover where Sentinel knows no usable master, made long:
    no replica to promote, so after kill -9 Sentinel reports the master down
    until it is back. The broker must keep asking and resubscribe when it is."""
    master = procs.redis("master")
    sentinel = procs.sentinel("sentinel", master.port)
    setup = SentinelSetup(master, master, sentinel, free_port())
    broker = await start_broker(*setup.broker_sets())
    async with stream(broker, "news") as s:
        master.kill()
        async with client(sentinel.port, decode_responses=True) as sc:
            await eventually(
                lambda: sc.execute_command("SENTINEL", "master", MASTER),
                lambda info: "s_down" in flags(info),
                timeout=10,
            )
            await broker.wait_not_ready(timeout=5)
            await asyncio.sleep(2)  # the broker asks again while Sentinel has no master
            procs.started.remove(master)
            restarted = procs.redis("master-again", port=master.port)
            procs.started.append(master)
            await eventually(
                lambda: sc.execute_command("SENTINEL", "master", MASTER),
                lambda info: "s_down" not in flags(info),
                timeout=10,
            )
        await broker.wait_ready(timeout=10)
        reset = await s.next_event(timeout=5)
        assert (reset.type, reset.json()["reason"]) == ("broker.reset", "outage")
        async with client(restarted.port) as r:
            await publish(r, "news", envelope("back"))
        assert (await s.next_event()).data == "back"


@pytest.mark.slow
async def test_a_sentinel_that_is_down_does_not_slow_master_discovery(
    start_broker: StartBroker, sentinel_setup: SentinelSetup
) -> None:
    """One of several sentinels is down (a common state: maintenance, a lost host).
    Asking it must cost a refused connection, not seconds: the broker asks
    Sentinel at every (re)subscribe, so that time adds to every failover's outage."""
    setup = sentinel_setup
    loop = asyncio.get_running_loop()
    started = loop.time()
    await start_broker(*setup.broker_sets())
    all_up = loop.time() - started
    started = loop.time()
    await start_broker(*setup.broker_sets(dead_sentinel_first=True))
    one_down = loop.time() - started
    assert one_down < all_up + 1.5, (
        f"ready in {one_down:.1f}s with a sentinel down, {all_up:.1f}s with all up"
    )


@pytest.mark.slow
async def test_sentinel_failover_stream_mode_resume_is_exact(
    start_broker: StartBroker, sentinel_setup: SentinelSetup
) -> None:
    setup = sentinel_setup
    sets = (*setup.broker_sets(), "ingest.mode=stream")
    broker = await start_broker(*sets)
    ids = []
    async with client(setup.master.port) as master, stream(broker, "news") as s:
        for i in range(1, 5):
            ids.append(
                (await master.xadd("sse:stream", {"channel": "news", "data": f"e{i}"})).decode()
            )
        # Replicated before the failover (WAIT: one replica acknowledged).
        assert await master.execute_command("WAIT", 1, 5000) >= 1
        assert [e.data for e in await s.events(4)] == ["e1", "e2", "e3", "e4"]

        await setup.fail_over()
        await broker.wait_ready(timeout=20)
        async with client(setup.replica.port) as new_master:
            ids.append(
                (await new_master.xadd("sse:stream", {"channel": "news", "data": "e5"})).decode()
            )
            # The open stream reads on: no reset, no gap, no duplicate.
            event = await s.next_event(timeout=10)
            assert (event.type, event.data, event.last_event_id) == ("message", "e5", ids[4])
            assert not s.pending

            # Resume from e2 on this broker, and on a broker started after the
            # failover (its history comes from the new master): exactly e3..e5.
            fresh = await start_broker(*sets)
            for b in (broker, fresh):
                async with stream(b, "news", last_event_id=ids[1]) as r:
                    got = await r.events(3)
                    assert [(e.data, e.last_event_id) for e in got] == [
                        ("e3", ids[2]),
                        ("e4", ids[3]),
                        ("e5", ids[4]),
                    ]
                    await new_master.xadd("sse:stream", {"channel": "news", "data": "live"})
                    assert (await r.next_event()).data == "live"
                    assert not r.pending
            assert (await s.next_event()).data == "live"


@pytest.mark.slow
async def test_stream_mode_is_not_ready_while_redis_is_away(
    start_broker: StartBroker, redis_server: RedisServer
) -> None:
    """An outage as a failover makes it (here: the only Redis stops for a while).
    Stream mode reads on afterwards without a gap, but while there is nothing to
    read from, ``/readyz`` must say so - every time a load balancer or Prometheus
    asks - and one outage is one reconnect."""
    broker = await start_broker("ingest.mode=stream")
    redis_server.stop()
    await broker.wait_not_ready(timeout=10)
    answers: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    until = loop.time() + 4
    while loop.time() < until:
        status, _ = await broker.get("/readyz")
        answers[status] = answers.get(status, 0) + 1
        await asyncio.sleep(0.05)
    connected = await broker.metric("sse_broker_redis_connected")
    redis_server.start()
    await broker.wait_ready(timeout=15)
    reconnects = await broker.metric("sse_broker_redis_reconnects_total")
    assert answers.get(200, 0) == 0, f"/readyz answers while Redis was down: {answers}"
    assert connected == 0
    assert reconnects == 1


# -- TLS -----------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    san: bool = False,
    client: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    def pem(cert: x509.Certificate, name: str) -> Path:
        path = directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = _cert("sse-broker test CA", ca_key, None, ca=True)
    other = _cert("some other CA", other_key, None, ca=True)
    server = _cert("redis.test", server_key, (ca.subject, ca_key), san=True)
    client_cert = _cert("sse-broker", client_key, (ca.subject, ca_key), client=True)
    return Pki(
        ca=pem(ca, "ca.pem"),
        server_cert=pem(server, "server.pem"),
        server_key=_write_key(server_key, directory / "server.key"),
        client_cert=pem(client_cert, "client.pem"),
        client_key=_write_key(client_key, directory / "client.key"),
        other_ca=pem(other, "other-ca.pem"),
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    path = tmp_path / "pki"
    path.mkdir()
    return make_pki(path)


def tls_redis(procs: Procs, pki: Pki, *, auth_clients: bool) -> Proc:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if auth_clients:
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    port = free_port()
    return procs.redis(
        "redis-tls",
        "--port", "0",
        "--tls-port", str(port),
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", "yes" if auth_clients else "no",
        port=port,
        ssl_context=ctx,
    )  # fmt: skip


def tls_client(server: Proc, pki: Pki, *, cert: bool = False) -> aioredis.Redis:
    extra = {"ssl_certfile": str(pki.client_cert), "ssl_keyfile": str(pki.client_key)}
    return aioredis.Redis(
        host=LOOPBACK,
        port=server.port,
        ssl=True,
        ssl_ca_certs=str(pki.ca),
        **(extra if cert else {}),
    )


async def test_tls_streams_events_and_publishes(
    start_broker: StartBroker, procs: Procs, pki: Pki, http: aiohttp.ClientSession
) -> None:
    server = tls_redis(procs, pki, auth_clients=False)
    broker = await start_broker(
        f'redis.url="rediss://{LOOPBACK}:{server.port}/0?ssl_ca_certs={pki.ca}"',
        f'publish.keys=["{PUBLISH_KEY}"]',
    )
    assert f"on rediss://{LOOPBACK}:{server.port}/0" in broker.log_text()
    redis = tls_client(server, pki)
    try:
        async with stream(broker, "news") as s:
            await publish(redis, "news", envelope("over tls"))
            assert (await s.next_event()).data == "over tls"
            # POST /publish goes out through the broker's own TLS command client.
            async with http.post(
                broker.admin_url + "/publish",  # type: ignore[operator]
                data=orjson.dumps({"channel": "news", "data": "published over tls"}),
                headers={
                    "Authorization": f"Bearer {PUBLISH_KEY}",
                    "Content-Type": "application/json",
                },
            ) as resp:
                assert resp.status == 200, await resp.text()
            assert (await s.next_event()).data == "published over tls"
    finally:
        await redis.aclose()


async def test_tls_with_the_wrong_ca_is_not_ready_and_says_why(
    start_broker: StartBroker, procs: Procs, pki: Pki
) -> None:
    server = tls_redis(procs, pki, auth_clients=False)
    broker = await start_broker(
        f'redis.url="rediss://{LOOPBACK}:{server.port}/0?ssl_ca_certs={pki.other_ca}"',
        wait_ready=False,
    )
    log = await wait_log(broker, r"subscribe failed .*certificate verify failed")
    assert f"redis rediss://{LOOPBACK}:{server.port}/0: subscribe failed" in log, log
    status, body = await broker.get("/readyz")
    assert status == 503, body
    assert await broker.metric("sse_broker_redis_connected") == 0


@pytest.mark.slow
async def test_mutual_tls_in_stream_mode(start_broker: StartBroker, procs: Procs, pki: Pki) -> None:
    """Client certificates (``ssl_certfile``/``ssl_keyfile``) on both of the broker's
    Redis paths: stream mode reads with redis-py (XREAD), the canary publishes."""
    server = tls_redis(procs, pki, auth_clients=True)
    query = f"ssl_ca_certs={pki.ca}&ssl_certfile={pki.client_cert}&ssl_keyfile={pki.client_key}"
    broker = await start_broker(
        f'redis.url="rediss://{LOOPBACK}:{server.port}/0?{query}"', "ingest.mode=stream"
    )
    redis = tls_client(server, pki, cert=True)
    try:
        async with stream(broker, "news") as s:
            await redis.xadd("sse:stream", {"channel": "news", "data": "mtls"})
            assert (await s.next_event()).data == "mtls"
    finally:
        await redis.aclose()
    # Without a client certificate the server refuses the broker.
    refused = await start_broker(
        f'redis.url="rediss://{LOOPBACK}:{server.port}/0?ssl_ca_certs={pki.ca}"',
        "ingest.mode=stream",
        wait_ready=False,
    )
    # The fence: it tried and was refused (a connection that worked would log
    # "reading stream" and be ready instead). redis-py retries the TLS connect
    # before the broker sees it fail: a few seconds.
    await eventually(
        lambda: asyncio.sleep(0, refused.log_path.read_text(errors="replace")),
        lambda text: "read failed" in text,
        timeout=20,
    )
    status, _ = await refused.get("/readyz")
    assert status == 503
    assert "reading stream" not in refused.log_path.read_text(errors="replace")


# -- ACL users and password files -------------------------------------------------------------


@pytest.fixture
async def acl_redis(redis_server: RedisServer) -> RedisServer:
    """``redis_server`` with a user ``app`` (password ``secret``) and the default user off."""
    async with client(redis_server.port) as admin:
        await admin.execute_command("ACL", "SETUSER", "app", "on", ">secret", "~*", "&*", "+@all")
        await admin.execute_command("ACL", "SETUSER", "default", "off")
    return redis_server


async def test_acl_user_password_in_the_url(
    start_broker: StartBroker, acl_redis: RedisServer
) -> None:
    port = acl_redis.port
    broker = await start_broker(f"redis.url=redis://app:secret@{LOOPBACK}:{port}/0")
    async with (
        client(port, username="app", password="secret", decode_responses=True) as app,
        stream(broker, "news") as s,
    ):
        await publish(app, "news", envelope("as app"))
        assert (await s.next_event()).data == "as app"
        clients = await app.execute_command("CLIENT", "LIST")
        ingest = [line for line in clients.splitlines() if "name=sse-broker-ingest" in line]
        assert len(ingest) == 1 and " user=app " in ingest[0], clients
    assert "secret" not in broker.log_path.read_text()


@pytest.mark.slow
async def test_acl_wrong_password_is_not_ready_without_leaking_it(
    start_broker: StartBroker, acl_redis: RedisServer
) -> None:
    wrong = "wrong-pw-7f3a9c"
    broker = await start_broker(
        f"redis.url=redis://app:{wrong}@{LOOPBACK}:{acl_redis.port}/0", wait_ready=False
    )
    log = await wait_log(broker, r"subscribe failed \(WRONGPASS")
    assert f"redis redis://{LOOPBACK}:{acl_redis.port}/0: subscribe failed (WRONGPASS" in log
    status, _ = await broker.get("/readyz")
    assert status == 503
    # a few more retries, each logged
    log = await eventually(
        lambda: asyncio.sleep(0, broker.log_path.read_text(errors="replace")),
        lambda text: text.count("subscribe failed (WRONGPASS") >= 4,
    )
    assert wrong not in log


@pytest.mark.slow
async def test_password_file(
    start_broker: StartBroker, acl_redis: RedisServer, tmp_path: Path
) -> None:
    secret_file = tmp_path / "redis.password"
    secret_file.write_text("secret\n")
    secret_file.chmod(0o600)
    broker = await start_broker(
        f"redis.url=redis://app@{LOOPBACK}:{acl_redis.port}/0",
        f"redis.password_file={secret_file}",
    )
    async with (
        client(acl_redis.port, username="app", password="secret") as app,
        stream(broker, "news") as s,
    ):
        await publish(app, "news", envelope("password from a file"))
        assert (await s.next_event()).data == "password from a file"
    # A missing file stops the start with a message naming the key.
    missing = await start_broker(
        f"redis.url=redis://app@{LOOPBACK}:{acl_redis.port}/0",
        f"redis.password_file={tmp_path / 'nope'}",
        wait_ready=None,
    )
    assert await missing.wait_exit() == 2
    assert "redis.password_file: cannot read" in missing.log_text()
