"""A real headless Chromium driven over the Chrome DevTools Protocol (aiohttp only).

Enough of CDP for the tests: open a page, navigate, evaluate JavaScript (awaiting
promises, values returned as JSON), and close everything at teardown. No new
Python dependency: the protocol is JSON over one WebSocket, in "flattened"
session mode (commands for a page carry its ``sessionId``).

Fixture (function scope): ``browser`` -> ``Browser``, with one page already open
(``browser.page``). Import it into a test module with
``from browser import browser  # noqa: F401``.

Chromium comes from Debian (``apt-get install -y chromium``); set ``CHROMIUM`` to
use another binary. A missing browser fails the test: it is never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 15.0
_DEVTOOLS_RE = re.compile(rb"DevTools listening on (ws://\S+)")
_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str:
    """The browser binary, or fail the test with how to install it."""
    override = os.environ.get("CHROMIUM")
    candidates = (override,) if override else _CANDIDATES
    for name in candidates:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail(
        f"no Chromium found (looked for {', '.join(candidates)}): the browser tests need a "
        "real one; install it with `apt-get install -y chromium` or set CHROMIUM=/path/to/it",
        pytrace=False,
    )


class CDPError(RuntimeError):
    """A DevTools command failed, or the page threw."""


class Page:
    """One page target, reached through its flattened CDP session."""

    def __init__(self, browser: Browser, session_id: str, target_id: str) -> None:
        self.browser = browser
        self.session_id = session_id
        self.target_id = target_id

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session_id=self.session_id)

    async def navigate(self, url: str, timeout: float = COMMAND_TIMEOUT) -> None:
        """Load ``url`` and return once its ``load`` event fired."""
        loaded = self.browser.expect_event("Page.loadEventFired", self.session_id)
        try:
            result = await self.send("Page.navigate", {"url": url})
            if result.get("errorText"):
                raise CDPError(f"navigating to {url} failed: {result['errorText']}")
            async with asyncio.timeout(timeout):
                await loaded
        finally:
            loaded.cancel()

    async def evaluate(self, expression: str, timeout: float = COMMAND_TIMEOUT) -> Any:
        """Evaluate ``expression`` in the page, await it if it is a promise, return its value.

        Raises CDPError with the page's message when the expression throws.
        """
        result = await self.send(
            "Runtime.evaluate",
            {
                "expression": expression,
                "awaitPromise": True,
                "returnByValue": True,
                "timeout": int(timeout * 1000),
            },
        )
        details = result.get("exceptionDetails")
        if details is not None:
            exc = details.get("exception", {})
            text = exc.get("description") or exc.get("value") or details.get("text")
            raise CDPError(f"page threw: {text}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.02) -> Any:
        """Poll a JavaScript expression inside the page until it is truthy; return its value."""
        what = json.dumps(expression)
        script = f"""
            new Promise((resolve, reject) => {{
                const deadline = Date.now() + {int(timeout * 1000)};
                const poll = () => {{
                    let value;
                    try {{ value = ({expression}); }} catch (e) {{ reject(e); return; }}
                    if (value) resolve(value);
                    else if (Date.now() > deadline) reject(new Error("timed out: " + {what}));
                    else setTimeout(poll, {int(interval * 1000)});
                }};
                poll();
            }})
        """
        return await self.evaluate(script, timeout=timeout + 5)


class Browser:
    """A headless Chromium process and its DevTools WebSocket."""

    def __init__(
        self, proc: asyncio.subprocess.Process, ws: aiohttp.ClientWebSocketResponse
    ) -> None:
        self.proc = proc
        self.ws = ws
        self.page: Page | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, str | None, asyncio.Future[dict[str, Any]]]] = []
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")
        self.stderr = bytearray()

    async def _read(self) -> None:
        error: BaseException = CDPError("the DevTools connection closed")
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = msg.json()
                if "id" in data:
                    future = self._pending.pop(data["id"], None)
                    if future is not None and not future.done():
                        if "error" in data:
                            future.set_exception(CDPError(f"{data['error']}"))
                        else:
                            future.set_result(data.get("result", {}))
                    continue
                method, session = data.get("method"), data.get("sessionId")
                for waiter in list(self._waiters):
                    name, wanted_session, future = waiter
                    if name == method and wanted_session in (None, session):
                        self._waiters.remove(waiter)
                        if not future.done():
                            future.set_result(data.get("params", {}))
        except Exception as exc:  # surfaced to whoever awaits a reply
            error = exc
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> dict[str, Any]:
        """One CDP command; its ``result`` (raises CDPError on an error reply)."""
        if self._reader.done():
            raise CDPError("the DevTools connection is closed")
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self.ws.send_json(message)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise CDPError(f"no answer to {method} within {timeout}s") from None
        finally:
            self._pending.pop(msg_id, None)

    def expect_event(self, method: str, session_id: str | None = None) -> asyncio.Future[Any]:
        """A future for the next ``method`` event (register it before causing the event)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, session_id, future))
        return future

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"], target["targetId"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send("Browser.close", timeout=5)
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def _devtools_url(proc: asyncio.subprocess.Process, seen: bytearray) -> str:
    assert proc.stderr is not None
    while True:
        line = await proc.stderr.readline()
        if not line:
            raise CDPError(
                f"chromium exited (code {await proc.wait()}) before DevTools listened:\n"
                f"{seen.decode(errors='replace')[-3000:]}"
            )
        seen += line
        match = _DEVTOOLS_RE.search(line)
        if match:
            return match.group(1).decode()


async def _drain(stream: asyncio.StreamReader, into: bytearray) -> None:
    # Keep reading stderr: a full pipe would block the browser.
    while chunk := await stream.read(65536):
        into += chunk
        del into[:-20000]


def _kill(proc: asyncio.subprocess.Process) -> None:
    # The browser runs in its own session: its renderer and GPU processes go too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def launch(user_data_dir: Path) -> AsyncIterator[Browser]:
    """Start headless Chromium with a private profile; yields a Browser with a page open."""
    binary = find_chromium()
    argv = [
        binary,
        "--headless",
        "--no-sandbox",  # we may run as root (CI containers)
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={user_data_dir}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    stderr = bytearray()
    drainer: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(START_TIMEOUT):
            url = await _devtools_url(proc, stderr)
        assert proc.stderr is not None
        drainer = asyncio.create_task(_drain(proc.stderr, stderr))
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url, max_msg_size=0, autoping=True)
            browser = Browser(proc, ws)
            browser.stderr = stderr
            try:
                browser.page = await browser.new_page()
                yield browser
            finally:
                await browser.close()
    finally:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await proc.wait()
        _kill(proc)
        await proc.wait()
        if drainer is not None:
            drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drainer


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    """A headless Chromium with one open page (``browser.page``), closed at teardown."""
    async with launch(tmp_path / "chromium-profile") as b:
        yield b
