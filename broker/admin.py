"""The admin listener: metrics, health and the publish API (never expose it publicly).

Every POST here must be ``Content-Type: application/json`` (``json_posts_only``).
"""

from __future__ import annotations

import hmac
import logging

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from broker.app import Broker
from broker.errors import BadRequest, BrokerError, Unauthorized
from broker.http import BROKER, error_response, healthz, json_response, readyz
from broker.ids import as_id
from broker.logs import quote
from broker.publish import MAX_ITEMS, parse_items, publish_events

log = logging.getLogger(__name__)

JSON = "application/json"
MAX_BODY = web.AppKey("max_body", int)  # bytes of a POST body, for the 413's message


def is_json(request: web.Request) -> bool:
    """``Content-Type: application/json``, any case, parameters (``; charset=utf-8``) allowed."""
    media_type = request.headers.get("Content-Type", "").partition(";")[0]
    return media_type.strip().lower() == JSON


@web.middleware
async def json_posts_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse (415) an admin POST that is not ``Content-Type: application/json``.

    A browser sends a cross-site POST without asking first (no CORS preflight)
    only with a form's content types (``application/x-www-form-urlencoded``,
    ``multipart/form-data``, ``text/plain``); a JSON POST is preflighted, and
    the admin listener grants no preflight. So no page on another site can
    make a visitor's browser publish or disconnect, even when the admin
    listener is reachable from that browser and no publish key is set.
    Checked before the handler runs (before authentication, before the body
    is read: cheap, and a form post never reaches an endpoint); an unknown
    path or method keeps its 404/405.
    """
    routed = request.match_info.http_exception is None
    if request.method == "POST" and routed and not is_json(request):
        given = request.headers.get("Content-Type")
        return error_response(
            BadRequest(
                f"admin POSTs must be 'Content-Type: {JSON}' (got {given!r:.80})",
                code="unsupported_media_type",
                status=415,
            )
        )
    return await handler(request)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[BROKER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _check_bearer(request: web.Request, keys: tuple[str, ...]) -> None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    ok = scheme.lower() == "bearer" and given != ""
    # Compare against every key (no early exit): timing reveals nothing.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if not (ok and matched):
        raise Unauthorized("a valid 'Authorization: Bearer <publish key>' is required")


async def publish(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    keys = broker.publish_keys
    if not keys:
        return json_response(
            404,
            {"error": "publish_disabled", "message": "set publish.keys or publish.keys_file"},
        )
    try:
        _check_bearer(request, keys)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(
                f"body over {request.app[MAX_BODY]} bytes", code="too_large", status=413
            ) from None
        events = parse_items(body, broker.cfg.limits.max_event_bytes, broker.cfg.ingest)
    except BrokerError as exc:
        return error_response(exc)
    try:
        ids = await publish_events(broker.redis(), broker.cfg, events)
    except (RedisError, OSError) as exc:
        log.warning("publish failed: redis error: %s", exc)
        return json_response(
            503,
            {"error": "redis_unavailable", "message": f"cannot write to Redis: {exc}"},
            {"Retry-After": "1"},
        )
    return json_response(200, {"published": len(events), "ids": ids})


async def disconnect(request: web.Request) -> web.Response:
    """``POST /admin/disconnect {"user": U, "tenant": T}``: close those streams now.

    Given both, only streams of that user in that tenant. When publish keys
    are configured the same bearer key is required; without them the admin
    listener (private by design) is the only guard, and ``json_posts_only``
    keeps cross-site form posts from browsers out.
    """
    broker = request.app[BROKER]
    try:
        if broker.publish_keys:
            _check_bearer(request, broker.publish_keys)
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body is not JSON: {exc}", code="bad_json") from None
        if not isinstance(doc, dict):
            raise BadRequest("expected a JSON object", code="bad_json")
        user, tenant = (_selector(doc, name) for name in ("user", "tenant"))
        if user is None and tenant is None:
            raise BadRequest("give 'user' and/or 'tenant'", code="no_selector")
    except BrokerError as exc:
        return error_response(exc)
    n = broker.streams.disconnect(user=user, tenant=tenant)
    log.info("admin disconnect user=%s tenant=%s: %d streams closed", quote(user), quote(tenant), n)
    return json_response(200, {"disconnected": n})


def _selector(doc: dict[str, object], name: str) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    return as_id(value, lambda why: BadRequest(f"field {name!r}: {why}", code="bad_" + name))


def admin_app(broker: Broker) -> web.Application:
    max_body = max(1 << 20, broker.cfg.limits.max_event_bytes * 4 * min(MAX_ITEMS, 16))
    app = web.Application(client_max_size=max_body, middlewares=[json_posts_only])
    app[BROKER] = broker
    app[MAX_BODY] = max_body
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/publish", publish)
    app.router.add_post("/admin/disconnect", disconnect)
    return app
