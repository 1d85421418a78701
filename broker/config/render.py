"""What ``sse-broker check-config`` prints: the effective config as TOML, and the
warnings about legal but risky settings (also logged at startup)."""

from __future__ import annotations

import ipaddress

from broker.config.listen import Listen
from broker.config.loader import read_config_file
from broker.config.model import KEYS, TABLES, Config, get
from broker.config.text import redact, toml_str, toml_value
from broker.errors import ConfigError
from broker.keyfiles import parse_secrets, short_secret_warnings


def dump_config(cfg: Config) -> str:
    """The effective config as TOML, secrets replaced by ``***``; loads back to ``cfg``."""
    lines = ["# sse-broker effective configuration"]
    if cfg.source is not None:
        lines.append(f"# file: {toml_str(cfg.source)}")
    for table in TABLES:
        lines += ["", f"[{table}]"]
        for key, spec in KEYS.items():
            if key.rpartition(".")[0] != table:
                continue
            name = key.rpartition(".")[2]
            value = get(cfg, key)
            if value is None:
                effective = toml_value(cfg.auth.effective_public_channels)
                lines.append(f"# {name} = {effective}  (unset: the default for this mode)")
                continue
            if spec.secret:
                value = redact(key, value)
            lines.append(f"{name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


_PROXY_READ_TIMEOUT = 60  # nginx proxy_read_timeout default


def _is_loopback(addr: Listen) -> bool:
    if addr.is_unix or addr.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr.host or "").is_loopback
    except ValueError:
        return False  # a host name: can't tell, assume reachable


def config_warnings(cfg: Config) -> list[str]:
    """Legal but risky settings, one human sentence each, for check-config and startup logs."""
    warnings: list[str] = []
    auth = cfg.auth
    if auth.mode == "none":
        public = ", ".join(auth.effective_public_channels) or "none"
        warnings.append(
            "AUTH IS OFF (auth.mode = 'none'): no credentials are checked; anyone who can reach "
            f"{cfg.server.listen} may subscribe to the public channels ({public}) - every "
            "channel but private-*/presence-* when that is '*'"
        )
    elif "*" in auth.effective_public_channels:
        warnings.append(
            "auth.public_channels contains '*': every channel but private-*/presence-* "
            "can be subscribed without credentials"
        )
    if cfg.ingest.mode == "pubsub" and cfg.server.workers > 1:
        warnings.append(
            f"server.workers = {cfg.server.workers} with ingest.mode = 'pubsub': replay history is "
            "per process, so a resume is exact only when it reaches the same worker (others "
            "reset); use ingest.mode = 'stream', or ingest.mode = 'bridge' to keep PUBLISH, "
            "for exact resume anywhere"
        )
    ingest = cfg.ingest
    if ingest.mode == "bridge" and ingest.bridge_buffer_seconds < 2 * ingest.bridge_lease_seconds:
        warnings.append(
            f"ingest.bridge_buffer_seconds = {ingest.bridge_buffer_seconds} is under twice "
            f"ingest.bridge_lease_seconds = {ingest.bridge_lease_seconds}: a takeover may not "
            "find its place in the buffer and write a hole (clients reset)"
        )
    if ingest.mode == "bridge" and cfg.redis.sentinels:
        warnings.append(
            "ingest.mode = 'bridge' with Sentinel: a failover may lose the newest appends; the "
            "bridge appends them again from its buffer, or writes a hole (clients reset)"
        )
    if cfg.sse.heartbeat_seconds >= _PROXY_READ_TIMEOUT:
        warnings.append(
            f"sse.heartbeat_seconds = {cfg.sse.heartbeat_seconds}: a reverse proxy's read timeout "
            f"(nginx default {_PROXY_READ_TIMEOUT}s) will cut idle streams; keep it well below"
        )
    admin = cfg.admin.listen_address
    if admin is not None and not _is_loopback(admin):
        warnings.append(
            f"admin.listen = {cfg.admin.listen!r} is not loopback: /metrics, /publish and "
            "/admin/disconnect must never be public; firewall it"
        )
    if admin is None and (cfg.publish.keys or cfg.publish.keys_file):
        warnings.append("publish keys are set but admin.listen is empty: POST /publish is off")
    if cfg.limits.write_buffer_bytes < cfg.limits.max_event_bytes:
        warnings.append(
            "limits.write_buffer_bytes < limits.max_event_bytes: one large event can make a "
            "healthy client look like a slow consumer"
        )
    if cfg.replay.max_events == 0 or cfg.replay.max_bytes == 0:
        warnings.append(
            "replay history is disabled (max_events or max_bytes = 0): every resume resets"
        )
    if auth.mode == "jwt" and auth.jwt.secret and len(auth.jwt.secret.encode()) < 32:
        warnings.append("auth.jwt.secret is shorter than 32 bytes: too weak for HMAC signing")
    if auth.mode == "jwt" and auth.jwt.secret_file:
        warnings += _secret_file_warnings(auth.jwt.secret_file)
    return warnings


def _secret_file_warnings(path: str) -> list[str]:
    """Short secrets of ``auth.jwt.secret_file``, one warning per line (never the secret)."""
    key = "auth.jwt.secret_file"
    try:
        secrets = parse_secrets(key, path, read_config_file(key, path))
    except ConfigError:
        return []  # an unreadable or malformed file is an error, reported by loading the keys
    return short_secret_warnings(key, path, secrets)
