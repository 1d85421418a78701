"""Command line: ``sse-broker serve | check-config | publish``.

Every option maps onto a config key: ``--set section.key=value`` overrides
anything (TOML value syntax, bare strings allowed), then ``SSE_BROKER_*``
environment variables, then the file, then the defaults.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any, NoReturn

import click
import orjson

from broker import systemd
from broker.config import ENV_WORKER, Config, config_warnings, dump_config, load_config
from broker.errors import ConfigError

_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (default: $SSE_BROKER_CONFIG, else built-in defaults).",
)
_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one config key (repeatable), e.g. --set server.listen=0.0.0.0:8080.",
)


def _fail(message: str) -> NoReturn:
    click.echo(f"sse-broker: error: {message}", err=True)
    sys.exit(2)


def _load(config_path: str | None, overrides: tuple[str, ...]) -> Config:
    path = config_path or os.environ.get("SSE_BROKER_CONFIG") or None
    try:
        cfg = load_config(path, overrides=overrides)
        check_files(cfg)
    except ConfigError as exc:
        _fail(exc.message)
    return cfg


def check_files(cfg: Config) -> None:
    """Read every file the config names (keys, secrets), so bad ones fail at start."""
    from broker.publish import load_publish_keys
    from broker.redis_conn import redis_target

    redis_target(cfg.redis)
    load_publish_keys(cfg)
    if cfg.auth.mode == "jwt":
        from broker.auth.jwt import load_keys

        load_keys(cfg.auth.jwt)


@click.group()
@click.version_option(package_name="sse-broker")
def main() -> None:
    """Stream events published into Redis to browsers over Server-Sent Events."""


@main.command()
@_config_option
@_set_option
def serve(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Run the broker until SIGTERM/SIGINT."""
    from broker.logs import setup_logging
    from broker.server import run

    cfg = _load(config_path, overrides)
    setup_logging(cfg.log.level, cfg.log.format)
    import logging

    if ENV_WORKER not in os.environ:  # the supervisor already said it
        for warning in config_warnings(cfg):
            logging.getLogger("broker").warning("config: %s", warning)
    path = config_path or os.environ.get("SSE_BROKER_CONFIG") or None

    def reload() -> Config:
        fresh = load_config(path, overrides=overrides)
        check_files(fresh)
        return fresh

    worker = os.environ.pop(ENV_WORKER, None)
    try:
        if worker is not None:  # started by a supervisor: inherit its listener
            _, fd, admin_path = worker.split(":", 2)
            public = socket.socket(fileno=int(fd))
            run(cfg, reload, sockets={"public": public}, admin_path=admin_path)
        elif cfg.server.workers > 1:
            from broker.workers import supervise

            sys.exit(supervise(cfg, sys.argv[1:]))
        else:
            run(cfg, reload, sockets=systemd.listen_sockets())
    except ConfigError as exc:
        _fail(exc.message)
    except OSError as exc:
        _fail(f"cannot listen: {exc}")


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
@_set_option
def check_config(file: str, overrides: tuple[str, ...]) -> None:
    """Validate FILE (with env and --set applied) and print the effective config."""
    cfg = _load(file, overrides)
    click.echo(dump_config(cfg), nl=False)
    for warning in config_warnings(cfg):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{file}: OK", err=True)


@main.command()
@click.option("--user", required=True, help="The user id (claim auth.jwt.user_claim).")
@click.option("--tenant", default=None, help="The tenant (claim auth.jwt.tenant_claim).")
@click.option(
    "--channel", "channels", multiple=True, help="A granted channel pattern (repeatable)."
)
@click.option("--ttl", default=3600, show_default=True, help="Seconds until the token expires.")
@_config_option
@_set_option
def token(
    user: str,
    tenant: str | None,
    channels: tuple[str, ...],
    ttl: int,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Mint a development JWT signed with the configured HS* secret."""
    from broker.auth.jwt import mint

    cfg = _load(config_path, overrides)
    try:
        click.echo(mint(cfg, user=user, tenant=tenant, channels=list(channels), ttl=ttl))
    except ConfigError as exc:
        _fail(exc.message)


def _parse_data(text: str) -> Any:
    """DATA is taken as JSON when it parses, else as a plain string."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


@main.command()
@click.argument("channel")
@click.argument("data")
@click.option("--event", default=None, help="SSE event name (default: message).")
@click.option("--tenant", default=None, help="Only connections of this tenant receive it.")
@click.option("--user", "users", multiple=True, help="Only these users receive it (repeatable).")
@click.option("--retain", default=None, help="Keep as retained state under this key.")
@_config_option
@_set_option
def publish(
    channel: str,
    data: str,
    event: str | None,
    tenant: str | None,
    users: tuple[str, ...],
    retain: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Publish DATA (JSON, or a plain string) on CHANNEL through the configured Redis."""
    from broker.errors import BrokerError
    from broker.publish import parse_items, publish_events
    from broker.redis_conn import redis_target

    cfg = _load(config_path, overrides)
    envelope: dict[str, Any] = {"channel": channel, "data": _parse_data(data)}
    for name, value in (("event", event), ("tenant", tenant), ("retain", retain)):
        if value:
            envelope[name] = value
    if users:
        envelope["users"] = list(users)
    try:
        events = parse_items(orjson.dumps(envelope), cfg.limits.max_event_bytes, cfg.ingest)
    except BrokerError as exc:
        _fail(exc.message)

    async def send() -> list[str]:
        client = redis_target(cfg.redis).client()
        try:
            return await publish_events(client, cfg, events)
        finally:
            await client.aclose()

    try:
        ids = asyncio.run(send())
    except Exception as exc:  # redis-py raises its own error types; report, do not trace
        _fail(f"cannot publish to Redis: {exc}")
    click.echo(f"published to {channel}" + (f" as {ids[0]}" if ids else ""))
