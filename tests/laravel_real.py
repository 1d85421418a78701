"""A real Laravel 8.83 application (``tests/laravel_app``) under ``php -S``.

Debian's ``php-laravel-framework`` installs the framework with its own
autoloaders on PHP's include path, so the app runs without composer:
Laravel's HTTP kernel, the ``web`` middleware group (encrypted cookies,
session, ``VerifyCsrfToken``), the session guard, ``Broadcast::routes()`` (its
own ``BroadcastController`` and ``RedisBroadcaster``) and ``broadcast()`` with
phpredis into the test's Redis. See ``tests/laravel_app/routes/*.php`` for
what it answers.

``LaravelApp.start`` runs it on a free loopback port with everything it
writes (sessions, manifests) under a temporary directory; ``login`` returns the
cookies a browser would hold afterwards (``laravel_session``, ``XSRF-TOKEN``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import LOOPBACK, REPO_ROOT, RedisServer, free_port, spawn

APP_DIR = REPO_ROOT / "tests" / "laravel_app"
PACKAGES = "php-cli php-redis php-laravel-framework"
REDIS_PREFIX = "laravel_database_"  # config/database.php: Laravel 8's default
START_TIMEOUT = 15.0


def require_laravel() -> str:
    """The php binary, with phpredis and Laravel on its include path; FAILS (never
    skips) naming the Debian packages when something is missing."""
    hint = f"apt-get install {PACKAGES}"
    php = shutil.which("php")
    if php is None:
        pytest.fail(
            f"php is not installed: these tests run a real Laravel app ({hint})", pytrace=False
        )
    probe = subprocess.run(
        [
            php,
            "-r",
            'echo extension_loaded("redis") ? "" : "phpredis is not loaded; ",'
            ' stream_resolve_include_path("Illuminate/Foundation/Application.php")'
            ' ? "" : "Laravel (Illuminate) is not on the include path";',
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout:
        pytest.fail(f"{probe.stdout or probe.stderr} ({hint})", pytrace=False)
    return php


def set_cookies(headers: Any) -> dict[str, str]:
    """``name -> value`` of every ``Set-Cookie`` header, values exactly as sent (a
    browser sends them back unchanged: Laravel's are url-encoded)."""
    cookies: dict[str, str] = {}
    for header in headers.getall("Set-Cookie", []):
        name, _, value = header.split(";", 1)[0].partition("=")
        cookies[name.strip()] = value.strip()
    return cookies


def browser(cookies: dict[str, str]) -> dict[str, str]:
    """The ``Cookie`` header a browser holding ``cookies`` sends."""
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}


class LaravelApp:
    """One ``php -S`` process serving ``tests/laravel_app``; see the module docstring."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.log_path = log_path
        # No cookie jar: every "browser" passes its cookies explicitly.
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=15)
        )

    @property
    def auth_url(self) -> str:
        """Laravel's own ``Broadcast::routes()`` endpoint."""
        return self.url + "/broadcasting/auth"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-12_000:]
        except FileNotFoundError:
            return "<no log>"

    @classmethod
    async def start(cls, redis: RedisServer, workdir: Path) -> LaravelApp:
        php = require_laravel()
        env = {
            **os.environ,
            "APP_KEY": "base64:" + base64.b64encode(os.urandom(32)).decode(),
            "LARAVEL_STORAGE_PATH": str(workdir / "storage"),
            "REDIS_HOST": redis.host,
            "REDIS_PORT": str(redis.port),
            "REDIS_PREFIX": REDIS_PREFIX,
            # php -S serves one request at a time unless it forks workers
            "PHP_CLI_SERVER_WORKERS": "4",
        }
        for attempt in range(3):
            port = free_port()
            log_path = workdir / f"php-{attempt}.log"
            proc = _spawn_php(php, port, env, log_path)
            app = cls(proc, f"http://{LOOPBACK}:{port}", log_path)
            try:
                await app._wait_up()
                return app
            except _PortTaken:
                await app.stop()
        pytest.fail("php -S found no free port in 3 attempts", pytrace=False)

    async def _wait_up(self) -> None:
        """Until ``GET /`` answers Laravel's JSON (the first request also writes the
        package and service manifests)."""
        deadline = time.monotonic() + START_TIMEOUT
        last = "no answer"
        while True:
            if self.proc.poll() is not None:
                if "Address already in use" in self.log_text():
                    raise _PortTaken
                await self.stop()
                pytest.fail(f"php -S exited at start:\n{self.log_text()}", pytrace=False)
            try:
                async with self.http.get(self.url + "/") as resp:
                    body = await resp.read()
                    if resp.status == 200 and b'"app":"laravel"' in body:
                        return
                    last = f"{resp.status} {body[:1000]!r}"
            except (aiohttp.ClientError, OSError) as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                await self.stop()
                pytest.fail(
                    f"the Laravel app did not answer within {START_TIMEOUT}s (last: {last})\n"
                    f"{self.log_text()}",
                    pytrace=False,
                )
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Any:
        """GET ``path`` (an app route: log in, broadcast); its JSON. Fails unless 200."""
        async with self.http.get(self.url + path, headers=headers) as resp:
            body = await resp.read()
            assert resp.status == 200, (path, resp.status, body[:2000])
            return orjson.loads(body)

    async def guest(self) -> dict[str, str]:
        """The cookies of a visitor who opened a page but did not log in."""
        async with self.http.get(self.url + "/") as resp:
            assert resp.status == 200, await resp.text()
            return set_cookies(resp.headers)

    async def login(self, user_id: int) -> dict[str, str]:
        """Log in as user ``user_id``: the browser's cookies afterwards."""
        async with self.http.get(f"{self.url}/login/{user_id}") as resp:
            body = await resp.read()
            assert resp.status == 200, body[:2000]
            assert orjson.loads(body) == {"user": user_id}
            cookies = set_cookies(resp.headers)
        assert set(cookies) == {"laravel_session", "XSRF-TOKEN"}, cookies
        return cookies


class _PortTaken(Exception):
    pass


def _spawn_php(php: str, port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    public = APP_DIR / "public"
    argv = [php, "-S", f"{LOOPBACK}:{port}", "-t", str(public), str(public / "index.php")]
    # its own session: its workers are in its process group, killed with it
    return spawn(argv, env, log_path, cwd=APP_DIR)
