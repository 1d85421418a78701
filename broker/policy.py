"""What a reload may change under open streams, as one immutable value.

Who may subscribe (the authenticator, public channels), who is believed
(trusted proxies), who may read (CORS) and who may publish (publish keys)
depend on each other and on the config they came from. A reload builds a
whole new :class:`Policy` — anything that can fail fails here — and the
broker swaps it in with one assignment, so a request never sees half of an
old policy and half of a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.access import Cors, Network, trusted_networks
from broker.auth import Authenticator
from broker.auth.factory import build_authenticator
from broker.auth.grants import Grants
from broker.config import Config
from broker.metrics import Metrics, Stats
from broker.publish import load_publish_keys


@dataclass(frozen=True, slots=True)
class Policy:
    cfg: Config
    auth: Authenticator
    public: Grants
    cors: Cors
    trusted: tuple[Network, ...]
    publish_keys: tuple[str, ...]

    @classmethod
    def build(cls, cfg: Config, stats: Stats, metrics: Metrics) -> Policy:
        """The policy of ``cfg``; raises (ConfigError) for unreadable keys."""
        return cls(
            cfg=cfg,
            auth=build_authenticator(cfg, stats, metrics),
            public=Grants.compile(cfg.auth.effective_public_channels),
            cors=Cors(cfg.server.cors_origins),
            trusted=trusted_networks(cfg.server.trusted_networks),
            publish_keys=load_publish_keys(cfg),
        )
