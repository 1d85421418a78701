"""The public listener: ``GET /events``, CORS and health.

A stream request is checked (channels, readiness, credentials, grants,
limits) before any byte is sent, so every refusal is a proper status with a JSON body. Retryable
refusals to an EventSource become a 200 carrying ``broker.reconnect``,
because a browser gives up for good on any other status.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web
from aiohttp.http import HttpVersion11

from broker import control, sse
from broker.access import client_ip, credentials, peer_is_trusted
from broker.admission import Slot
from broker.app import Broker
from broker.auth import Identity, authorize
from broker.connection import Connection, tune_socket
from broker.envelope import check_channel
from broker.errors import BadRequest, BrokerError, Forbidden, Rejected, Retryable, Unauthorized
from broker.guard import admitted
from broker.logs import quote
from broker.metrics import Stats
from broker.recheck import needs_recheck

log = logging.getLogger(__name__)

BROKER = web.AppKey("broker", Broker)

STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}


def json_response(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )


def error_response(exc: BrokerError) -> web.Response:
    headers: dict[str, str] = {}
    if isinstance(exc, Retryable):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="sse-broker"'
    return json_response(exc.status, exc.to_json(), headers)


def wants_event_stream(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


def requested_channels(request: web.Request, max_channels: int) -> tuple[str, ...]:
    """The distinct ``channel`` query values, in request order; BadRequest when unusable."""
    channels = tuple(dict.fromkeys(request.query.getall("channel", ())))
    if not channels:
        raise BadRequest("at least one channel parameter is required", code="no_channel")
    if len(channels) > max_channels:
        raise BadRequest(
            f"{len(channels)} channels requested; limits.max_channels_per_connection "
            f"is {max_channels}",
            code="too_many_channels",
        )
    for name in channels:
        try:
            check_channel(name)
        except Rejected as exc:
            raise BadRequest(exc.message, code=exc.code) from None
    return channels


class ClientGone(Exception):
    """The client hung up before its stream started."""


def check_ready(broker: Broker) -> None:
    reason = broker.not_ready_reason()
    if reason is not None:
        raise Retryable(
            f"broker not ready: {reason}",
            code=reason,
            status=503,
            reason="drain" if reason == "draining" else "not_ready",
        )


async def admit(broker: Broker, request: web.Request) -> tuple[Connection, Identity, Slot]:
    """Every check a stream request must pass, cheapest first; raises BrokerError.

    The last check reserves the stream's slot in the limits (nothing after it
    can fail): the caller owns the slot and releases it when the stream ends.
    """
    cfg = broker.cfg
    channels = requested_channels(request, cfg.limits.max_channels_per_connection)
    check_ready(broker)  # before auth: no callback to the app while we cannot serve
    ip = client_ip(request, broker.trusted)
    creds = credentials(request, cfg, ip, via_proxy=peer_is_trusted(request, broker.trusted))
    try:
        identity = await broker.auth.authenticate(creds, channels)
        authorize(identity, broker.public, channels, anonymous_may_log_in=cfg.auth.mode != "none")
    except (Unauthorized, Forbidden) as exc:
        broker.stats.auth_failures[exc.code] += 1
        raise
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ClientGone()
    scan = broker.resume.needs_scan(channels, last_event_id(request), broker.hub.seq)
    slot = broker.admission.reserve(identity.tenant, ip, scan=scan)
    tune_socket(transport, cfg.sse.write_timeout_seconds, cfg.limits.write_buffer_bytes)
    conn = Connection(
        transport,
        chunked=request.version >= HttpVersion11,
        channels=channels,
        user=identity.user,
        tenant=identity.tenant,
        remote=ip,
        socket_id=creds.socket_id,
    )
    conn.auth_key = identity.key
    if cfg.auth.recheck_interval_seconds and needs_recheck(cfg.auth.mode, identity, channels):
        conn.credentials = creds
    return conn, identity, slot


async def soft_refusal(request: web.Request, exc: Retryable, retry_ms: int) -> web.StreamResponse:
    """A 200 stream that only says "come back later", then ends."""
    resp = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    resp.force_close()
    await resp.prepare(request)
    await resp.write(control.reconnect_frame(exc.reason, control.jitter(retry_ms), None))
    await resp.write_eof()
    return resp


async def events(request: web.Request) -> web.StreamResponse:
    broker = request.app[BROKER]
    try:
        conn, identity, slot = await admit(broker, request)
    except ClientGone:
        return web.Response(status=400)  # nobody reads it; no traceback for a hang-up
    except Retryable as exc:
        broker.stats.requests_refused[exc.code] += 1
        if wants_event_stream(request):
            return await soft_refusal(request, exc, broker.cfg.sse.retry_ms)
        return error_response(exc)
    except BrokerError as exc:
        broker.stats.requests_refused[exc.code] += 1
        return error_response(exc)
    admitted(request)  # a stream now, no longer pending (guard.py)
    try:
        return await stream_events(broker, request, conn, identity, slot)
    finally:
        broker.admission.release(slot)


async def stream_events(
    broker: Broker, request: web.Request, conn: Connection, identity: Identity, slot: Slot
) -> web.StreamResponse:
    """Serve an admitted stream until it ends. Every way out — the client leaving,
    a deadline, a drain, a bug — passes the one ``finally``: the connection is
    finished (so no index, heap or timer keeps it) and unregistered."""
    resp = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    resp.force_close()  # a stream ends with its connection
    try:
        await resp.prepare(request)
        resume_from = last_event_id(request)
        await broker.intake.catch_up(resume_from)
        # Registered (paused) before anything is written: whatever is published
        # from here on queues up behind the backlog, so nothing is missed and
        # nothing is sent twice.
        position = broker.streams.register(conn, identity.expires_at)
        # Registered first: while a channel has a stream, the hub never releases it.
        await broker.ingest.subscribe(conn.channels)
        frames = await broker.resume.backlog(conn, resume_from, position)
        broker.admission.scanned(slot)
        preamble = sse.encode_retry(broker.cfg.sse.retry_ms) + sse.encode_comment("ok") + b"\n"
        limit = broker.cfg.limits.write_buffer_bytes
        await write_backlog(resp, conn, preamble, frames, limit, broker.stats)
        broker.hub.start(conn)
        await conn.done
    except asyncio.CancelledError:
        conn.finish("client_closed")
        raise
    except ConnectionError:  # the client hung up while the backlog was written
        conn.finish("client_closed")
    except Exception:
        conn.finish("error", abort=True)
        broker.stats.requests_refused["internal_error"] += 1
        _log_stream_error()
    finally:
        conn.finish("client_closed")  # a no-op when it ended otherwise
        broker.streams.unregister(conn)
        log_close(conn)
    return resp


_next_error_log = 0.0


def _log_stream_error() -> None:
    """A bug's traceback, at most once per 10 s: a client that can trigger it
    must not be able to flood the log (the metric counts every one)."""
    global _next_error_log
    now = time.monotonic()
    if now >= _next_error_log:
        _next_error_log = now + 10.0
        log.exception("stream failed (further failures within 10 s are only counted)")


def last_event_id(request: web.Request) -> str | None:
    """The resume position: the header wins (on automatic reconnects the query is stale).

    An empty value is no position, as for a browser (it omits the header then).
    """
    header = request.headers.get("Last-Event-ID", "").strip()
    return header or request.query.get("last_event_id", "").strip() or None


BACKLOG_BATCH = 64 * 1024


async def write_backlog(
    resp: web.StreamResponse,
    conn: Connection,
    preamble: bytes,
    frames: list[bytes],
    limit: int,
    stats: Stats,
) -> None:
    """Write the preamble and backlog through aiohttp, paced by the socket.

    ``resp.write`` waits whenever the transport is over its high-water mark,
    so a replay far larger than the socket buffer goes out as fast as the
    client reads it and is never mistaken for a slow consumer. Live events
    meanwhile queue on the paused connection; if *they* outgrow the write
    buffer limit the client is too slow for the live rate. Bytes and slow
    consumers count in ``stats`` as they do once the hub writes.
    """
    batch = [preamble]
    size = len(preamble)
    for frame in frames:
        batch.append(frame)
        size += len(frame)
        if size >= BACKLOG_BATCH:
            await _write(resp, conn, b"".join(batch), stats)
            batch, size = [], 0
            if sum(map(len, conn.pending)) > limit:
                stats.slow_consumers += 1
                conn.finish("slow_consumer", abort=True)
                return
    await _write(resp, conn, b"".join(batch), stats)
    conn.events_sent += len(frames)


async def _write(resp: web.StreamResponse, conn: Connection, data: bytes, stats: Stats) -> None:
    await resp.write(data)
    if data:  # aiohttp writes no chunk for nothing
        sent = conn.wire_size(len(data))
        conn.bytes_sent += sent
        stats.bytes_sent += sent


def log_close(conn: Connection) -> None:
    log.info(
        "stream closed remote=%s channels=%d duration=%.1fs frames=%d bytes=%d reason=%s "
        "user=%s tenant=%s",
        quote(conn.remote),
        len(conn.channels),
        time.monotonic() - conn.opened_at,
        conn.events_sent,
        conn.bytes_sent,
        conn.close_reason,
        quote(conn.user),
        quote(conn.tenant),
    )


async def healthz(request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    reason = request.app[BROKER].not_ready_reason()
    if reason is None:
        return json_response(200, {"status": "ready"})
    return json_response(503, {"status": "not_ready", "reason": reason}, {"Retry-After": "1"})


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, streams included, carries CORS headers for an allowed Origin."""
    cors = request.app[BROKER].cors
    if cors.enabled:
        response.headers.update(cors.headers(request.headers.get("Origin")))
        response.headers.add("Vary", "Origin")


async def preflight(request: web.Request) -> web.Response:
    cors = request.app[BROKER].cors
    headers = cors.preflight_headers(request.headers.get("Origin"))
    # Without an allowed origin: no CORS headers at all, so the browser refuses.
    return web.Response(status=204, headers=headers)


def public_app(broker: Broker) -> web.Application:
    app = web.Application()
    app[BROKER] = broker
    app.on_response_prepare.append(add_cors_headers)
    app.router.add_get(broker.cfg.server.path, events, allow_head=False)
    app.router.add_route("OPTIONS", broker.cfg.server.path, preflight)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
