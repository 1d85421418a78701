"""The live dashboard example (``examples/dashboard/``) in a real headless Chromium.

Served as its README says: static files from one origin, the broker on another with
``server.cors_origins`` allowing the page, fed by the demo ``publisher.py``. The test
checks what renders, then writes the screenshot the README shows (``docs/dashboard.png``),
then takes Redis away and back to see the page handle ``broker.reset``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from browser import Browser, Page, browser  # noqa: F401
from conftest import RedisServer, StartBroker
from helpers import envelope, publish, serve

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
PUBLISHER = EXAMPLES / "dashboard" / "publisher.py"
# The picture the README shows; rewritten only on request (UPDATE_SCREENSHOT=1),
# so a test run leaves the checkout as it was.
DOCS_SCREENSHOT = REPO / "docs" / "dashboard.png"
WIDTH, HEIGHT = 1280, 800


@contextlib.asynccontextmanager
async def static_site() -> AsyncIterator[str]:
    """``examples/`` over HTTP on a free loopback port (like ``python -m http.server``)."""
    app = web.Application()
    app.router.add_static("/examples", EXAMPLES)
    async with serve(app) as url:
        yield url


async def screenshot(page: Page) -> bytes:
    result = await page.send("Page.captureScreenshot", {"format": "png"})
    return base64.b64decode(result["data"])


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; AssertionError when it is no PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def text(page: Page, selector: str) -> str:
    value = await page.evaluate(f"document.querySelector({selector!r}).textContent")
    assert isinstance(value, str)
    return value


async def run_publisher(redis_url: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PUBLISHER),
        "--redis-url",
        redis_url,
        *args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            _, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stderr.decode(errors="replace")


@pytest.mark.slow
async def test_dashboard_renders_live_events_takes_screenshot_and_handles_reset(
    browser: Browser,  # noqa: F811
    start_broker: StartBroker,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    page = browser.page
    assert page is not None
    async with static_site() as origin:
        broker = await start_broker(f'server.cors_origins=["{origin}"]', "sse.retry_ms=1000")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        await page.navigate(
            f"{origin}/examples/dashboard/index.html"
            f"?broker={broker.url}&channels=orders,metrics,log"
        )
        await page.wait_for("document.getElementById('state').dataset.state === 'open'")
        assert await text(page, "#state") == "connected"
        assert await text(page, "#broker-url") == f"{broker.url}/events"
        socket_id = await page.evaluate("dashboard.client.socketId")
        assert re.fullmatch(r"\d+\.\d+", socket_id) and await text(page, "#socket-id") == socket_id

        # The demo feed, as the README runs it (bounded, seeded).
        started = time.monotonic()
        code, log = await run_publisher(
            redis_server.url, "--seconds", "4", "--rate", "12", "--seed", "7"
        )
        assert code == 0, log
        assert time.monotonic() - started < 10
        match = re.search(r"published (\d+) events", log)
        assert match, log
        published = int(match.group(1))
        assert published >= 40

        # Every published event rendered exactly once, over one connection. The fence:
        # one more log line, published after the feed; once it shows, any duplicate of
        # the feed's events (delivered in publish order) has been rendered too.
        await page.wait_for(f"dashboard.stats.events === {published}", timeout=10)
        fence = {"level": "info", "message": "demo feed over"}  # never sent by the publisher
        await publish(redis_server.client(), "log", envelope(fence, event="log"))
        await page.wait_for(
            f"document.querySelector('#log li .msg').textContent === {fence['message']!r}"
        )
        published += 1
        stats: dict[str, Any] = await page.evaluate("dashboard.stats")
        assert stats["events"] == published, stats
        assert stats["byType"]["metric"] >= 4 and stats["byType"]["order.created"] >= 3
        assert stats["resets"] == 0
        assert await page.evaluate("document.querySelectorAll('.tile').length") == 4
        assert await page.evaluate("document.querySelectorAll('#orders tr').length") >= 3
        assert await page.evaluate("document.querySelectorAll('#log li').length") >= 5
        assert await text(page, "#event-count") == str(published)
        assert await text(page, "#orders-count") == str(stats["byType"]["order.created"])
        assert "Active users" in await text(page, "#tiles")
        assert re.fullmatch(r"p\d+-\d+", await text(page, "#last-id"))
        assert await text(page, "#state") == "connected"
        assert await page.evaluate("document.getElementById('banner').hidden") is True
        assert await broker.metric("sse_broker_connections") == 1

        # The screenshot for the README: live events, connected.
        await asyncio.sleep(1.6)  # let the "new row" highlights fade
        png = await screenshot(page)
        assert png_size(png) == (WIDTH, HEIGHT)
        assert 30_000 < len(png) < 3_000_000, len(png)
        target = DOCS_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "dash.png"
        target.write_bytes(png)
        assert png_size(target.read_bytes()) == (WIDTH, HEIGHT)

        # Redis goes away and comes back: the stream gets broker.reset (outage) and then
        # the retained state (the four metric tiles); the page shows the banner and clears
        # the orders feed it can no longer trust.
        redis_server.stop()
        await broker.wait_not_ready()
        redis_server.start()
        await broker.wait_ready()
        await page.wait_for("dashboard.stats.resets === 1", timeout=10)
        banner = await text(page, "#banner")
        assert await page.evaluate("document.getElementById('banner').hidden") is False
        assert "missed" in banner and "outage" in banner, banner
        assert await page.evaluate("document.querySelectorAll('#orders tr.note').length") == 1
        assert await page.evaluate("dashboard.stats.events") == published + 4  # retained tiles
        assert await page.evaluate("document.querySelectorAll('.tile').length") == 4
        await publish(
            redis_server.client(),
            "orders",
            envelope(
                {"id": 9001, "customer": "After Reset", "items": 1, "total": 5},
                event="order.created",
            ),
        )
        await page.wait_for("document.getElementById('order-9001') !== null")
        assert await text(page, "#state") == "connected"
