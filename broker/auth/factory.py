"""The authenticator for ``auth.mode``."""

from __future__ import annotations

from broker.auth import Authenticator, NoAuth
from broker.config import Config
from broker.metrics import Metrics, Stats


def build_authenticator(cfg: Config, stats: Stats, metrics: Metrics) -> Authenticator:
    mode = cfg.auth.mode
    if mode == "jwt":
        from broker.auth.jwt import JwtAuth

        return JwtAuth(cfg)
    if mode == "callback":
        from broker.auth.callback import CallbackAuth

        return CallbackAuth(cfg, stats, metrics)
    if mode == "laravel":
        from broker.auth.laravel import LaravelAuth

        return LaravelAuth(cfg, stats, metrics)
    return NoAuth()
