"""The command line as an operator uses it (real processes, real Redis)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, BrokerProcess
from sse_client import SSEClient


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SSE_BROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**base, **(env or {})},
        timeout=30,
    )


def test_check_config_prints_effective_config_without_secrets(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        '[redis]\nurl = "redis://app:hunter2@127.0.0.1:6379/2"\n[sse]\nheartbeat_seconds = 20\n'
    )
    result = run_cli("check-config", str(path), "--set", "sse.retry_ms=1500")
    assert result.returncode == 0, result.stderr
    assert "heartbeat_seconds = 20" in result.stdout
    assert "retry_ms = 1500" in result.stdout
    assert "max_connections = 100000" in result.stdout  # defaults shown too
    assert "hunter2" not in result.stdout + result.stderr
    assert f"{path}: OK" in result.stderr
    assert "auth.mode" in result.stderr  # the auth-off warning


def test_check_config_errors_name_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[sse]\nheartbeat_secs = 5\n[limits]\nmax_connections = "many"\n')
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "sse.heartbeat_secs" in result.stderr
    assert "sse.heartbeat_seconds" in result.stderr  # the suggestion
    assert "limits.max_connections" in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_env_and_set_errors_name_their_source(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text("")
    result = run_cli("check-config", str(path), env={"SSE_BROKER_SSE_RETRY_MS": "soon"})
    assert result.returncode == 2
    assert "sse.retry_ms" in result.stderr and "SSE_BROKER_SSE_RETRY_MS" in result.stderr
    result = run_cli("check-config", str(path), "--set", "ingest.mode=carrier-pigeon")
    assert result.returncode == 2
    assert "ingest.mode" in result.stderr and "--set" in result.stderr


def test_serve_refuses_a_bad_config_before_starting(tmp_path: Path) -> None:
    result = run_cli("serve", "--set", "server.listen=nowhere")
    assert result.returncode == 2
    assert "server.listen" in result.stderr


def test_shipped_config_file_is_valid() -> None:
    result = run_cli("check-config", str(REPO_ROOT / "config" / "broker.toml"))
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
async def test_publish_command_reaches_a_stream(broker: BrokerProcess, redis_server) -> None:
    async with SSEClient.connect(broker.events_url("orders")) as s:
        await s.wait_for(lambda st: st.parser.retry is not None)
        result = await asyncio.to_thread(
            run_cli,
            "publish",
            "orders",
            '{"id": 5}',
            "--event",
            "order.created",
            "--set",
            f"redis.url={redis_server.url}",
        )
        assert result.returncode == 0, result.stderr
        assert "published to orders" in result.stdout
        event = await s.next_event()
    assert (event.type, event.json()) == ("order.created", {"id": 5})


@pytest.mark.slow
def test_publish_command_reports_an_unreachable_redis() -> None:
    result = run_cli("publish", "orders", "x", "--set", "redis.url=redis://127.0.0.1:1/0")
    assert result.returncode == 2
    assert "cannot publish to Redis" in result.stderr
    assert "Traceback" not in result.stderr
