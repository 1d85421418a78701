"""The admin listener: metrics and health (never expose it publicly)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.app import Broker
from broker.http import BROKER, healthz, readyz


async def metrics(request: web.Request) -> web.Response:
    body = request.app[BROKER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def admin_app(broker: Broker) -> web.Application:
    app = web.Application()
    app[BROKER] = broker
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
