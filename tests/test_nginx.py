"""A real nginx (the Debian package) in front of real brokers, with the shipped
``config/nginx.conf``.

The server block is made runnable by substituting only what is site-specific:
the listen address (a free loopback port instead of 443, no IPv6), the upstream
(the broker's port), the certificate (a self-signed one made here) and the log
path. Everything else - the SSE location, the ``error_page`` fallback, the
access-log format without query strings, HTTP/2 - is tested as shipped. nginx
runs in the foreground with its own prefix, pid file and temp directories.
Clients speak HTTPS with verification off (HTTP/1.1 through aiohttp; HTTP/2 is
checked with ALPN and with a real Chromium EventSource).
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from browser import Browser, browser  # noqa: F401
from conftest import LOOPBACK, REPO_ROOT, BrokerProcess, StartBroker, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import envelope, eventually, publish
from sse_client import SSEClient, SSEStream

SHIPPED = REPO_ROOT / "config" / "nginx.conf"
# A client that ends an HTTP/1.1-over-TLS stream cleanly (close_notify, then FIN)
# is noticed by nginx only at its next write to it: a heartbeat. One-second
# heartbeats make the close (the broker's close log line, nginx's access log
# line) come within a second instead of sse.heartbeat_seconds (15).
HEARTBEAT_1S = "sse.heartbeat_seconds=1"
TOKEN = "tok-6f1d2c9a8b7e4f30a1b2c3d4e5f60718"  # must never reach a log


# -- certificate, config, process ---------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "events.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def substitute(text: str, pattern: str, replacement: str) -> str:
    """Replace exactly one line matching ``pattern``: a changed shipped file fails loudly."""
    new, count = re.subn(pattern, lambda _: replacement, text, flags=re.M)
    assert count == 1, f"config/nginx.conf: expected one line matching {pattern!r}, got {count}"
    return new


def render(*, nginx_port: int, broker_port: int, cert: Path, key: Path, access_log: Path) -> str:
    """config/nginx.conf with the site-specific lines pointed at this test."""
    text = SHIPPED.read_text()
    text = substitute(
        text, r"^\s*listen 443 ssl http2;$", f"    listen {LOOPBACK}:{nginx_port} ssl http2;"
    )
    text = substitute(text, r"^\s*listen \[::\]:443 ssl http2;$", "")
    text = substitute(
        text, r"^\s*server 127\.0\.0\.1:8080;$", f"    server {LOOPBACK}:{broker_port};"
    )
    text = substitute(text, r"^\s*ssl_certificate\s+\S+;$", f"    ssl_certificate {cert};")
    text = substitute(text, r"^\s*ssl_certificate_key\s+\S+;$", f"    ssl_certificate_key {key};")
    text = substitute(
        text, r"^\s*access_log\s+\S+\s+sse_broker;$", f"    access_log {access_log} sse_broker;"
    )
    return text


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    port: int
    prefix: Path
    access_log: Path
    error_log: Path

    @property
    def base(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def access_text(self) -> str:
        return self.access_log.read_text(errors="replace") if self.access_log.exists() else ""

    def error_text(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""


StartNginx = Callable[[int], Awaitable[Nginx]]


@pytest.fixture
async def start_nginx(tmp_path: Path) -> AsyncIterator[StartNginx]:
    """Factory: ``await start_nginx(broker_port)`` -> a running nginx (foreground)."""
    binary = shutil.which("nginx", path=os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin")))
    assert binary is not None, "nginx is not installed (apt-get install nginx-light)"
    started: list[Nginx] = []

    async def start(broker_port: int) -> Nginx:
        prefix = tmp_path / f"nginx-{len(started)}"
        prefix.mkdir()
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir()
        cert, key = self_signed(prefix)
        port = free_port()
        access_log = prefix / "access.log"
        error_log = prefix / "error.log"
        site = prefix / "sse-broker.conf"
        site.write_text(
            render(
                nginx_port=port,
                broker_port=broker_port,
                cert=cert,
                key=key,
                access_log=access_log,
            )
        )
        main = prefix / "nginx.conf"
        main.write_text(
            "worker_processes 1;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"    client_body_temp_path {prefix}/client_body;\n"
            f"    proxy_temp_path {prefix}/proxy;\n"
            f"    fastcgi_temp_path {prefix}/fastcgi;\n"
            f"    uwsgi_temp_path {prefix}/uwsgi;\n"
            f"    scgi_temp_path {prefix}/scgi;\n"
            f"    include {site};\n"
            "}\n"
        )
        argv = [
            binary,
            "-p", str(prefix),
            "-c", str(main),
            "-e", str(error_log),
            "-g", f"daemon off; pid {prefix}/nginx.pid; error_log {error_log} info;",
        ]  # fmt: skip
        test = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
        assert test.returncode == 0, f"nginx -t failed:\n{test.stderr}\n{site.read_text()}"
        with (prefix / "stderr.log").open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        handle = Nginx(proc, port, prefix, access_log, error_log)
        started.append(handle)
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"nginx exited:\n{handle.error_text()}"
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
                break
            assert time.monotonic() < deadline, f"nginx not listening:\n{handle.error_text()}"
            await asyncio.sleep(0.02)
        return handle

    try:
        yield start
    finally:
        for handle in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(handle.proc.pid, signal.SIGKILL)
            handle.proc.wait()
            print(f"\n--- nginx error log\n{handle.error_text()[-4000:]}")


@dataclass
class Stack:
    broker: BrokerProcess
    nginx: Nginx
    broker_port: int


@pytest.fixture
async def stack(start_broker: StartBroker, start_nginx: StartNginx) -> Stack:
    """A broker (public listener on a known port) behind nginx."""
    port = free_port()
    broker = await start_broker(
        f"server.listen={LOOPBACK}:{port}", "sse.retry_ms=500", HEARTBEAT_1S
    )
    return Stack(broker, await start_nginx(port), port)


@contextlib.asynccontextmanager
async def https_session(source: str | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    """HTTP/1.1 over TLS, certificate not verified; optionally from another loopback address."""
    connector = aiohttp.TCPConnector(ssl=False, limit=0, local_addr=(source, 0) if source else None)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


@contextlib.asynccontextmanager
async def stream(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    last_event_id: str | None = None,
) -> AsyncIterator[SSEStream]:
    async with SSEClient.connect(
        url, session=session, headers=headers, last_event_id=last_event_id
    ) as s:
        assert s.status == 200, await s.text()
        await s.wait_for(lambda st: "ok" in st.parser.comments, what="the preamble")
        yield s


# -- through the proxy ---------------------------------------------------------------------


async def test_events_arrive_one_by_one_unbuffered_and_resume_is_exact(
    stack: Stack, redis_client
) -> None:
    loop = asyncio.get_running_loop()
    url = stack.nginx.url("/events?channel=news")
    latencies = []
    async with (
        https_session() as session,
        stream(session, url, headers={"Accept-Encoding": "gzip, br"}) as s,
    ):
        assert s.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert "Content-Encoding" not in s.headers  # gzip off: compression holds events back
        assert s.headers["Server"].startswith("nginx")
        for i in range(6):
            sent = loop.time()
            await publish(redis_client, "news", envelope({"i": i}))
            # Each event arrives on its own, before the next one is published: a
            # buffering proxy would hold these ~60-byte frames back.
            event = await s.next_event(timeout=2)
            latencies.append(loop.time() - sent)
            assert event.json() == {"i": i}
            assert not s.pending
        ids = [s.parser.last_event_id]
    assert sorted(latencies)[len(latencies) // 2] < 0.2, latencies

    # Resume through the proxy: Last-Event-ID reaches the broker, the missed
    # events come back exactly, then live ones.
    for i in range(6, 9):
        await publish(redis_client, "news", envelope({"i": i}))
    async with https_session() as session, stream(session, url, last_event_id=ids[0]) as s:
        missed = await s.events(3)
        assert [e.json() for e in missed] == [{"i": 6}, {"i": 7}, {"i": 8}]
        await publish(redis_client, "news", envelope({"i": 9}))
        assert (await s.next_event()).json() == {"i": 9}
        assert not s.pending


@pytest.mark.slow
async def test_forwarded_for_reaches_the_broker_per_ip_limit(
    start_broker: StartBroker, start_nginx: StartNginx
) -> None:
    port = free_port()
    broker = await start_broker(
        f"server.listen={LOOPBACK}:{port}",
        f'server.trusted_proxies=["{LOOPBACK}"]',
        "limits.max_connections_per_ip=1",
        HEARTBEAT_1S,
    )
    nginx = await start_nginx(port)
    url = nginx.url("/events?channel=news")
    # Clients from two other loopback addresses: nginx (127.0.0.1) is the peer
    # the broker sees, X-Forwarded-For names the client.
    async with (
        https_session("127.0.0.2") as alice,
        https_session("127.0.0.3") as bob,
        stream(alice, url),
    ):
        # A second stream from the same client address is over the per-IP limit:
        # the retryable 200 + broker.reconnect (limit) for an EventSource.
        async with SSEClient.connect(url, session=alice) as second:
            assert second.status == 200
            event = await second.next_event()
            assert (event.type, event.json()["reason"]) == ("broker.reconnect", "limit")
        # Another address is not affected.
        async with stream(bob, url):
            pass
    log = await eventually(
        lambda: asyncio.sleep(0, broker.log_text()),
        lambda text: all(f"stream closed remote=127.0.0.{i} " in text for i in (2, 3)),
    )
    assert "remote=127.0.0.1 " not in log


async def test_admin_paths_are_not_exposed_and_tokens_stay_out_of_the_access_log(
    stack: Stack,
) -> None:
    nginx = stack.nginx
    async with https_session() as session:
        for method, path in (
            ("POST", "/publish"),
            ("GET", "/metrics"),
            ("POST", "/admin/disconnect"),
            ("GET", "/admin/disconnect"),
            ("GET", "/"),
            ("GET", "/events/../metrics"),
        ):
            async with session.request(method, nginx.url(path), data=b"{}") as resp:
                body = await resp.text()
                assert resp.status == 404, (method, path, resp.status, body[:200])
                assert "nginx" in body  # nginx's own page: the broker never saw it
        for path in ("/healthz", "/readyz"):
            async with session.get(nginx.url(path)) as resp:
                assert resp.status == 200, path
                assert (await resp.json())["status"] in ("ok", "ready")
        async with stream(session, nginx.url(f"/events?channel=news&token={TOKEN}")):
            pass
    # nginx writes the access log line when the request ends.
    log = await eventually(
        lambda: asyncio.sleep(0, nginx.access_text()),
        lambda text: '"GET /events HTTP/1.1" 200' in text,
    )
    assert TOKEN not in log
    assert "token=" not in log and "channel=" not in log, log
    assert '"GET /metrics HTTP/1.1" 404' in log


async def test_http2_is_offered_to_browsers(stack: Stack) -> None:
    """ALPN: nginx offers h2, so a browser's tabs share one connection instead of
    hitting HTTP/1.1's six-per-host cap. (Chromium streaming over it through this
    config: the last test of this module.)"""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        ctx.set_alpn_protocols(offered)
        with (
            socket.create_connection((LOOPBACK, stack.nginx.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="events.example.com") as tls,
        ):
            assert tls.selected_alpn_protocol() == chosen


@pytest.mark.slow
async def test_broker_down_keeps_an_event_source_retrying_until_it_is_back(
    start_broker: StartBroker,
    start_nginx: StartNginx,
    redis_client,
    browser: Browser,  # noqa: F811
) -> None:
    port = free_port()
    sets = (f"server.listen={LOOPBACK}:{port}", "sse.retry_ms=300", "shutdown.drain_seconds=1")
    broker = await start_broker(*sets)
    nginx = await start_nginx(port)
    await browser.send("Security.setIgnoreCertificateErrors", {"ignore": True})
    page = browser.page
    assert page is not None
    await page.navigate(nginx.url("/healthz"))  # same origin as the stream
    # A real EventSource over HTTP/2 through nginx.
    assert await page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol") == (
        "h2"
    )
    await page.evaluate(
        """
        window.got = []; window.errors = 0; window.opens = 0; window.states = [];
        window.es = new EventSource('/events?channel=news');
        es.onmessage = (e) => got.push(e.data);
        es.onopen = () => { opens += 1; };
        es.onerror = () => { errors += 1; states.push(es.readyState); };
        true
        """
    )
    await page.wait_for("window.opens >= 1")
    await eventually(lambda: broker.metric("sse_broker_connections"), lambda n: n == 1)
    await publish(redis_client, "news", "one")
    await page.wait_for("window.got.includes('one')")

    # The broker stops (drain: broker.reconnect, then exit). nginx cannot reach
    # it and answers the EventSource with its 200 + retry: fallback.
    broker.terminate()
    assert await broker.wait_exit() == 0
    async with (
        https_session() as session,
        session.get(
            nginx.url("/events?channel=news"), headers={"Accept": "text/event-stream"}
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers.get("Cache-Control") == "no-cache"
        body = await resp.text()
    assert re.fullmatch(r"retry: \d+\n\n", body), body
    # The browser keeps trying: errors, never CLOSED (readyState 2).
    await page.wait_for("window.errors >= 2", timeout=15)
    states = await page.evaluate("window.states")
    assert 2 not in states and await page.evaluate("es.readyState") != 2, states

    # The broker is back on the same address: the same EventSource gets events again.
    broker = await start_broker(*sets)
    await eventually(lambda: broker.metric("sse_broker_connections"), lambda n: n == 1, timeout=15)
    await publish(redis_client, "news", "two")
    await page.wait_for("window.got.includes('two')")
    assert await page.evaluate("es.readyState") == 1  # OPEN
    access = nginx.access_text()
    assert re.search(r'"GET /events HTTP/2\.0" 200', access), access
