"""Broker configuration: one frozen dataclass per TOML section, loaded from file + env + ``--set``.

Every key of ``config/broker.toml`` is a field of a section class, declared
with its default and its check in one line (``schema.setting``); the table of
known keys, the ``SSE_BROKER_*`` environment names and the TOML dump are all
derived from these classes, so adding a key is adding that line (and its line
in ``config/broker.toml``). Values that need parsing (listen addresses, proxy
networks) are parsed once, when a section is made, and stored beside the key.

Modules: ``server``, ``redis``, ``ingest``, ``auth`` (the sections), ``model``
(the whole config and its key table), ``loader``, ``render`` (the dump and the
warnings), and the helpers ``schema`` (declaring keys and checks), ``listen``
(addresses) and ``text`` (TOML text, redaction).
"""

from broker.config.auth import (
    AuthConfig,
    CallbackConfig,
    HttpAuthConfig,
    JwtConfig,
    LaravelConfig,
)
from broker.config.ingest import (
    IngestConfig,
    PublishConfig,
    ReplayConfig,
)
from broker.config.listen import Listen, parse_listen
from broker.config.loader import (
    ENV_CONFIG,
    ENV_PREFIX,
    ENV_WORKER,
    env_var,
    load_config,
    read_config_file,
)
from broker.config.model import Config
from broker.config.redis import RedisConfig
from broker.config.render import config_warnings, dump_config
from broker.config.server import (
    AdminConfig,
    LimitsConfig,
    LogConfig,
    Network,
    ServerConfig,
    ShutdownConfig,
    SseConfig,
)
from broker.config.text import REDACTED

__all__ = [
    "ENV_CONFIG",
    "ENV_PREFIX",
    "ENV_WORKER",
    "REDACTED",
    "AdminConfig",
    "AuthConfig",
    "CallbackConfig",
    "Config",
    "HttpAuthConfig",
    "IngestConfig",
    "JwtConfig",
    "LaravelConfig",
    "LimitsConfig",
    "Listen",
    "LogConfig",
    "Network",
    "PublishConfig",
    "RedisConfig",
    "ReplayConfig",
    "ServerConfig",
    "ShutdownConfig",
    "SseConfig",
    "config_warnings",
    "dump_config",
    "env_var",
    "load_config",
    "parse_listen",
    "read_config_file",
]
