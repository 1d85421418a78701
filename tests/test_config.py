"""Config loading: defaults, file, env, --set, validation, redaction, dump, warnings."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import pytest

from broker.config import (
    Config,
    Listen,
    config_warnings,
    dump_config,
    env_var,
    load_config,
    parse_listen,
)
from broker.config.model import KEYS
from broker.config.text import redact_url
from broker.errors import BrokerError, ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "broker.toml"


def load(text: str | None = None, tmp_path: Path | None = None, **kwargs: Any) -> Config:
    """Load with an empty environment (the test runner's must not leak in)."""
    kwargs.setdefault("env", {})
    if text is None:
        return load_config(**kwargs)
    assert tmp_path is not None
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return load_config(path, **kwargs)


def get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def config_error(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("server.listen", "127.0.0.1:8080"),
        ("server.path", "/events"),
        ("server.cors_origins", ()),
        ("server.trusted_proxies", ()),
        ("server.workers", 1),
        ("admin.listen", "127.0.0.1:9464"),
        ("redis.url", "redis://127.0.0.1:6379/0"),
        ("redis.password_file", ""),
        ("redis.sentinels", ()),
        ("redis.sentinel_master", ""),
        ("ingest.mode", "pubsub"),
        ("ingest.format", "native"),
        ("ingest.prefix", "sse:"),
        ("ingest.stream_key", "sse:stream"),
        ("replay.ttl_seconds", 300),
        ("replay.max_events", 10000),
        ("replay.max_bytes", 67108864),
        ("replay.max_retained_keys", 100000),
        ("replay.max_retained_bytes", 67108864),
        ("sse.heartbeat_seconds", 15),
        ("sse.retry_ms", 3000),
        ("sse.max_connection_age_seconds", 1800),
        ("auth.mode", "none"),
        ("auth.public_channels", None),
        ("auth.grants", ()),
        ("auth.cookie", "sse_token"),
        ("auth.query_param", "token"),
        ("auth.jwt.algorithms", ("HS256",)),
        ("auth.jwt.secret", ""),
        ("auth.jwt.user_claim", "sub"),
        ("auth.jwt.tenant_claim", "tenant"),
        ("auth.jwt.channels_claim", "channels"),
        ("auth.jwt.leeway_seconds", 5),
        ("auth.callback.url", ""),
        ("auth.callback.credential_cookies", ("laravel_session",)),
        ("auth.callback.timeout_seconds", 2.0),
        ("auth.callback.cache_ttl_seconds", 30),
        ("auth.callback.max_concurrency", 64),
        ("auth.laravel.url", "http://127.0.0.1/broadcasting/auth"),
        ("auth.laravel.timeout_seconds", 2.0),
        ("publish.keys", ()),
        ("publish.keys_file", ""),
        ("limits.max_connections", 100000),
        ("limits.max_connections_per_tenant", 0),
        ("limits.max_connections_per_ip", 0),
        ("limits.max_channels_per_connection", 32),
        ("limits.max_event_bytes", 262144),
        ("limits.write_buffer_bytes", 262144),
        ("shutdown.drain_seconds", 10),
        ("log.level", "info"),
        ("log.format", "text"),
    ],
)
def test_defaults_match_design(key: str, expected: Any) -> None:
    cfg = load()
    assert get(cfg, key) == expected
    assert type(get(cfg, key)) is type(expected)


def test_defaults_need_no_file_and_equal_the_dataclass_defaults() -> None:
    cfg = load()
    assert cfg == Config()
    assert cfg.source is None


def test_sections_are_frozen_and_slotted() -> None:
    cfg = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.workers = 2  # type: ignore[misc]
    assert not hasattr(cfg.server, "__dict__")
    assert not hasattr(cfg.auth.jwt, "__dict__")


def test_known_keys_are_dotted_and_cover_nested_sections() -> None:
    keys = list(KEYS)
    assert keys[0] == "server.listen"
    assert "auth.jwt.secret_file" in keys
    assert "auth.laravel.max_concurrency" in keys
    # the 57 keys of DESIGN.md plus replay.max_retained_keys / max_retained_bytes,
    # ingest.canary_interval_seconds, sse.write_timeout_seconds and
    # auth.recheck_interval_seconds (issue 10), and issue 11's seven keys
    assert "auth.recheck_interval_seconds" in keys
    assert "server.header_timeout_seconds" in keys
    assert len(keys) == len(set(keys)) == 72


def test_env_var_names() -> None:
    assert env_var("redis.url") == "SSE_BROKER_REDIS_URL"
    assert env_var("auth.jwt.secret_file") == "SSE_BROKER_AUTH_JWT_SECRET_FILE"


# --------------------------------------------------------------------------- sources


def test_file_values_are_loaded(tmp_path: Path) -> None:
    cfg = load(
        """
        [server]
        listen = "0.0.0.0:9000"
        cors_origins = ["https://app.example.com", "https://*.example.com:8443"]
        [sse]
        heartbeat_seconds = 20
        [auth]
        grants = ["tenant.{tenant}.*", "user.{user}"]
        public_channels = []
        [auth.callback]
        timeout_seconds = 1
        """,
        tmp_path,
    )
    assert cfg.server.listen == "0.0.0.0:9000"
    assert cfg.server.cors_origins == ("https://app.example.com", "https://*.example.com:8443")
    assert cfg.sse.heartbeat_seconds == 20
    assert cfg.auth.grants == ("tenant.{tenant}.*", "user.{user}")
    assert cfg.auth.public_channels == ()
    # A float key accepts an integer and stores a float.
    assert cfg.auth.callback.timeout_seconds == 1.0
    assert isinstance(cfg.auth.callback.timeout_seconds, float)
    assert cfg.source == str(tmp_path / "broker.toml")
    assert cfg.server.workers == 1  # untouched keys keep their defaults


def test_path_may_be_a_pathlike(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('[log]\nlevel = "debug"\n')
    assert load_config(path, env={}).log.level == "debug"


@pytest.mark.parametrize(
    ("name", "value", "key", "expected"),
    [
        ("SSE_BROKER_REDIS_URL", "redis://cache:6380/2", "redis.url", "redis://cache:6380/2"),
        ("SSE_BROKER_AUTH_JWT_SECRET_FILE", "/etc/sse/jwt", "auth.jwt.secret_file", "/etc/sse/jwt"),
        ("SSE_BROKER_SSE_HEARTBEAT_SECONDS", "30", "sse.heartbeat_seconds", 30),
        ("SSE_BROKER_LOG_LEVEL", "debug", "log.level", "debug"),
        ("SSE_BROKER_LOG_LEVEL", '"warning"', "log.level", "warning"),
        ("SSE_BROKER_AUTH_GRANTS", '["a.*", "b"]', "auth.grants", ("a.*", "b")),
        ("SSE_BROKER_AUTH_CALLBACK_TIMEOUT_SECONDS", "0.5", "auth.callback.timeout_seconds", 0.5),
        ("SSE_BROKER_ADMIN_LISTEN", "", "admin.listen", ""),
        # A str key keeps digits as text instead of failing on the parsed int.
        ("SSE_BROKER_REDIS_SENTINEL_MASTER", "123", "redis.sentinel_master", "123"),
        ("SSE_BROKER_AUTH_JWT_SECRET", "true", "auth.jwt.secret", "true"),
    ],
)
def test_env_overrides_a_key(name: str, value: str, key: str, expected: Any) -> None:
    # Keep the secret checks of mode jwt out of the way: mode stays "none".
    assert get(load(env={name: value}), key) == expected


def test_env_ignores_the_config_variable_and_foreign_variables() -> None:
    cfg = load(env={"SSE_BROKER_CONFIG": "/nope.toml", "PATH": "/bin", "SSE_BROKERX": "1"})
    assert cfg == Config()


def test_env_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSE_BROKER_SSE_RETRY_MS", "5000")
    assert load_config().sse.retry_ms == 5000


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("SSE_BROKER_REDIS_URI", "SSE_BROKER_REDIS_URL"),
        ("SSE_BROKER_AUTH_JWT_SECRETFILE", "SSE_BROKER_AUTH_JWT_SECRET_FILE"),
        ("SSE_BROKER_FOO", None),
    ],
)
def test_unknown_env_variable_is_an_error_naming_it(name: str, suggestion: str | None) -> None:
    message = config_error(env={name: "1"})
    assert message.startswith(f"{name}: unknown environment variable")
    if suggestion:
        assert f'did you mean "{suggestion}"?' in message
    else:
        assert "did you mean" not in message


@pytest.mark.parametrize(
    ("item", "key", "expected"),
    [
        ("server.workers=1", "server.workers", 1),
        ("server.listen=unix:/run/sse.sock", "server.listen", "unix:/run/sse.sock"),
        ('server.listen="[::1]:8080"', "server.listen", "[::1]:8080"),
        ("redis.url=rediss://:pw@redis:6380/1", "redis.url", "rediss://:pw@redis:6380/1"),
        (
            'server.cors_origins=["https://a.example"]',
            "server.cors_origins",
            ("https://a.example",),
        ),
        ("auth.public_channels=[]", "auth.public_channels", ()),
        ("ingest.prefix=", "ingest.prefix", ""),
        ("ingest.prefix=a=b", "ingest.prefix", "a=b"),
        ("log.format=json", "log.format", "json"),
        ("auth.callback.timeout_seconds=3", "auth.callback.timeout_seconds", 3.0),
        ("limits.max_event_bytes=1_024", "limits.max_event_bytes", 1024),
        ("log.level = debug", "log.level", "debug"),
        ("redis.sentinel_master= 'a b' ", "redis.sentinel_master", "a b"),
        # A newline cannot smuggle a second TOML key in: the value stays one string.
        ("ingest.prefix=x\nsse.retry_ms = 1", "ingest.prefix", "x\nsse.retry_ms = 1"),
    ],
)
def test_set_takes_toml_values_and_bare_strings(item: str, key: str, expected: Any) -> None:
    cfg = load(overrides=[item])
    assert get(cfg, key) == expected
    assert cfg.sse.retry_ms == 3000


def test_later_set_wins_over_earlier_set() -> None:
    cfg = load(overrides=["sse.retry_ms=1", "sse.retry_ms=2"])
    assert cfg.sse.retry_ms == 2


def test_precedence_set_over_env_over_file_over_default(tmp_path: Path) -> None:
    cfg = load(
        """
        [sse]
        heartbeat_seconds = 20
        retry_ms = 4000
        max_connection_age_seconds = 600
        """,
        tmp_path,
        env={"SSE_BROKER_SSE_HEARTBEAT_SECONDS": "25", "SSE_BROKER_SSE_RETRY_MS": "5000"},
        overrides=["sse.heartbeat_seconds=30"],
    )
    assert cfg.sse.heartbeat_seconds == 30  # --set
    assert cfg.sse.retry_ms == 5000  # env
    assert cfg.sse.max_connection_age_seconds == 600  # file
    assert cfg.replay.ttl_seconds == 300  # default


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("server.workers", "server.workers"),  # no "="
        ("server.wrokers=2", 'did you mean "server.workers"'),
        ("nope=1", "nope"),
        ("auth.jwt=1", "auth.jwt: is a section"),
    ],
)
def test_bad_set_is_an_error_naming_it(item: str, needle: str) -> None:
    message = config_error(overrides=[item])
    assert needle in message


# --------------------------------------------------------------------------- file errors


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(missing, env={})


def test_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    message = config_error(text='[server]\nlisten = "127.0.0.1:8080\n', tmp_path=tmp_path)
    assert str(tmp_path / "broker.toml") in message
    assert "invalid TOML" in message
    assert "line 2" in message


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[server]\nlisten_addr = 'x'\n", ["server.listen_addr", "unknown key", '"server.listen"']),
        ("[sse]\nheartbeat = 5\n", ["sse.heartbeat", '"sse.heartbeat_seconds"']),
        # A known key in the wrong section points at its real home.
        ("[server]\nheartbeat_seconds = 5\n", ['"sse.heartbeat_seconds"']),
        ("[servr]\nlisten = 'x'\n", ["servr", "unknown section", '"server"']),
        ("[auth.jwtt]\nsecret = 'x'\n", ["auth.jwtt", '"auth.jwt"']),
        ("workers = 2\n", ["workers", '"server.workers"']),
        ("zzzzzz = 2\n", ["zzzzzz", "unknown key"]),
        ("server = 1\n", ["server: expected a table"]),
    ],
)
def test_unknown_key_in_file_names_key_file_and_suggestion(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    message = config_error(text=text, tmp_path=tmp_path)
    assert f"(from {tmp_path / 'broker.toml'})" in message
    for needle in needles:
        assert needle in message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    message = config_error(
        text="[server]\nworkers = 0\nbogus = 1\n[log]\nlevel = 'loud'\n", tmp_path=tmp_path
    )
    assert len(message.splitlines()) == 3
    assert "server.workers" in message
    assert "server.bogus" in message
    assert "log.level" in message


def test_config_error_is_a_broker_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerError) as info:
        load(overrides=["server.workers=0"])
    assert info.value.code == "config"


# --------------------------------------------------------------------------- value errors


def test_wrong_type_names_key_value_and_source(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    assert config_error(text="[sse]\nheartbeat_seconds = 'abc'\n", tmp_path=tmp_path) == (
        f'sse.heartbeat_seconds: expected an integer, got "abc" (from {path})'
    )
    assert config_error(env={"SSE_BROKER_SSE_HEARTBEAT_SECONDS": "abc"}) == (
        'sse.heartbeat_seconds: expected an integer, got "abc" '
        "(from SSE_BROKER_SSE_HEARTBEAT_SECONDS)"
    )
    assert config_error(overrides=["sse.heartbeat_seconds=abc"]) == (
        'sse.heartbeat_seconds: expected an integer, got "abc" (from --set)'
    )


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("server.workers=true", "expected an integer, got true"),
        ("server.workers=1.0", "expected an integer, got 1.0"),
        ("auth.callback.timeout_seconds=true", "expected a number"),
        ("auth.callback.timeout_seconds=inf", "expected a number"),
        ("server.cors_origins=https://a.example", "expected an array of strings"),
        ("auth.grants=[1, 2]", "expected an array of strings"),
        ("log.level=[1]", None),  # a str key takes the raw text: then the enum check fails
    ],
)
def test_type_errors(item: str, expected: str | None) -> None:
    message = config_error(overrides=[item])
    assert message.startswith(item.partition("=")[0] + ": ")
    assert message.endswith("(from --set)")
    if expected is not None:
        assert expected in message


def test_value_from_a_toml_table_is_a_type_error(tmp_path: Path) -> None:
    message = config_error(text="[server.listen]\nhost = 'x'\n", tmp_path=tmp_path)
    assert "server.listen: expected a string, got a table" in message


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("server.workers=0", "between 1 and 256"),
        ("server.workers=257", "between 1 and 256"),
        ("replay.ttl_seconds=0", ">= 1"),
        ("replay.max_events=-1", ">= 0"),
        ("replay.max_bytes=-1", ">= 0"),
        ("sse.heartbeat_seconds=0", "between 1 and 3600"),
        ("sse.heartbeat_seconds=3601", "between 1 and 3600"),
        ("sse.retry_ms=-1", "between 0 and 3600000"),
        ("sse.retry_ms=3600001", "between 0 and 3600000"),
        ("sse.max_connection_age_seconds=5", "0 (never) or >= 10"),
        ("limits.max_connections=-1", ">= 0"),
        ("limits.max_connections_per_tenant=-1", ">= 0"),
        ("limits.max_connections_per_ip=-1", ">= 0"),
        ("limits.max_channels_per_connection=0", ">= 1"),
        ("limits.max_event_bytes=63", "between 64 and 67108864"),
        ("limits.max_event_bytes=67108865", "between 64 and 67108864"),
        ("limits.write_buffer_bytes=4095", ">= 4096"),
        ("shutdown.drain_seconds=-1", "between 0 and 3600"),
        ("shutdown.drain_seconds=3601", "between 0 and 3600"),
        ("auth.callback.timeout_seconds=0", "> 0"),
        ("auth.laravel.timeout_seconds=-1", "> 0"),
        ("auth.laravel.timeout_seconds=61", "<= 60"),
        ("auth.callback.cache_ttl_seconds=-1", ">= 0"),
        ("auth.callback.max_concurrency=0", ">= 1"),
        ("auth.laravel.max_concurrency=0", ">= 1"),
        ("auth.jwt.leeway_seconds=-1", "between 0 and 300"),
    ],
)
def test_out_of_range_values_are_rejected(item: str, needle: str) -> None:
    message = config_error(overrides=[item])
    assert message.startswith(item.partition("=")[0] + ": ")
    assert needle in message


@pytest.mark.parametrize(
    "item",
    [
        "sse.max_connection_age_seconds=0",
        "sse.max_connection_age_seconds=10",
        "sse.retry_ms=0",
        "replay.max_events=0",
        "shutdown.drain_seconds=0",
        "limits.max_event_bytes=64",
        "limits.write_buffer_bytes=4096",
        "server.workers=1",
        "auth.callback.cache_ttl_seconds=0",
        "ingest.prefix=",
        "auth.cookie=",
        "auth.query_param=",
    ],
)
def test_boundary_values_are_accepted(item: str) -> None:
    load(overrides=[item])


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("ingest.mode=kafka", "pubsub | stream"),
        ("ingest.format=json", "native | laravel"),
        ("auth.mode=oauth", "none | jwt | callback | laravel"),
        ("log.level=INFO", "debug | info | warning | error"),
        ("log.level=verbose", "debug | info | warning | error"),
        ("log.format=xml", "text | json"),
    ],
)
def test_bad_enum_lists_the_choices(item: str, needle: str) -> None:
    message = config_error(overrides=[item])
    assert message.startswith(item.partition("=")[0] + ": must be one of")
    assert needle in message


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("server.path=events", 'starting with "/"'),
        ("server.path=/events?x=1", 'starting with "/"'),
        ("server.path=/healthz", "health endpoint"),
        ("server.cors_origins=['https://a.example/']", "scheme://host[:port]"),
        ("server.cors_origins=['a.example']", "scheme://host[:port]"),
        ("server.cors_origins=['*']", "scheme://host[:port]"),
        ("server.cors_origins=['https://a.example:99999']", "scheme://host[:port]"),
        ("server.trusted_proxies=['nginx']", "IP addresses or CIDR"),
        ("redis.url=http://x:6379", "scheme must be redis, rediss or unix"),
        ("redis.url=redis://x:port/0", "not a valid URL"),
        ("redis.url=redis://x:6379/db", "database number"),
        ("redis.url=unix:relative.sock", "absolute socket path"),
        ("redis.sentinels=['sentinel']", "redis.sentinels"),
        ("redis.sentinels=['unix:/x.sock']", '"host:port"'),
        ("ingest.stream_key=", "must not be empty"),
        ("auth.grants=['']", "non-empty"),
        ("auth.grants=['a b']", "non-empty"),
        ("auth.public_channels=['']", "non-empty"),
        ("auth.grants=['tenant.{tenant_id}']", "placeholders"),
        ("auth.cookie=a;b", "cookie name"),
        ("auth.query_param=a&b", "query parameter"),
        ("auth.jwt.algorithms=[]", "at least one"),
        ("auth.jwt.algorithms=['none']", "unsupported algorithm"),
        ("auth.jwt.user_claim=", "must not be empty"),
        ("auth.callback.url=ftp://app/auth", "http:// or https://"),
        ("auth.callback.credential_cookies=['']", "cookie name"),
        ("publish.keys=['']", "non-empty"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(item: str, needle: str) -> None:
    message = config_error(overrides=[item])
    assert message.startswith(item.partition("=")[0] + ": ")
    assert needle in message
    assert message.endswith("(from --set)")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8080", Listen(host="127.0.0.1", port=8080)),
        ("0.0.0.0:1", Listen(host="0.0.0.0", port=1)),
        ("localhost:65535", Listen(host="localhost", port=65535)),
        ("[::1]:9464", Listen(host="::1", port=9464)),
        ("[::]:80", Listen(host="::", port=80)),
        ("unix:/run/sse-broker/sse.sock", Listen(path="/run/sse-broker/sse.sock")),
    ],
)
def test_parse_listen_accepts(value: str, expected: Listen) -> None:
    assert parse_listen(value, "server.listen") == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "8080",
        ":8080",
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:http",
        "::1:8080",
        "[::g]:8080",
        "bad host:80",
        "unix:relative.sock",
        "unix:",
        "unix:/" + "x" * 200,
    ],
)
def test_bad_listen_address_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^admin\.listen: "):
        parse_listen(value, "admin.listen")
    message = config_error(env={"SSE_BROKER_SERVER_LISTEN": value})
    assert message.startswith("server.listen: ")
    assert message.endswith("(from SSE_BROKER_SERVER_LISTEN)")


def test_listen_address_properties() -> None:
    cfg = load(overrides=["server.listen=unix:/run/s.sock", "admin.listen=[::1]:9000"])
    assert cfg.server.listen == "unix:/run/s.sock"  # the original text is kept
    assert cfg.server.listen_address == Listen(path="/run/s.sock")
    assert cfg.server.listen_address.is_unix
    assert cfg.admin.listen_address == Listen(host="::1", port=9000)
    assert load(overrides=["admin.listen="]).admin.listen_address is None


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["redis.sentinels=['s1:26379']"],
            "redis.sentinel_master: required when redis.sentinels is set (from --set)",
        ),
        (["admin.listen=127.0.0.1:8080"], "admin.listen: must differ from server.listen"),
        (
            ["redis.url=redis://:pw@r:6379/0", "redis.password_file=/etc/pw"],
            "redis.password_file: set it or a password in redis.url",
        ),
        (
            ["ingest.mode=stream", "ingest.format=laravel"],
            "ingest.format: 'laravel' requires ingest.mode = 'pubsub' or 'bridge'",
        ),
        (["auth.mode=jwt"], "auth.jwt.secret: auth.jwt.secret or auth.jwt.secret_file"),
        (
            ["auth.mode=jwt", "auth.jwt.secret=s", "auth.jwt.secret_file=/f"],
            "not both",
        ),
        (
            ["auth.mode=jwt", "auth.jwt.algorithms=['RS256']"],
            "auth.jwt.public_key_file: required for RS256",
        ),
        (["auth.mode=callback"], "auth.callback.url: required when auth.mode = 'callback'"),
        (
            ["auth.mode=laravel", "auth.laravel.url="],
            "auth.laravel.url: required when auth.mode = 'laravel'",
        ),
    ],
)
def test_cross_key_rules(overrides: list[str], needle: str) -> None:
    assert needle in config_error(overrides=overrides)


# --------------------------------------------------------------------------- every mode is served


def test_stream_mode_is_supported() -> None:
    cfg = load_config(None, env={}, overrides=["ingest.mode=stream", "ingest.stream_key=app:ev"])
    assert (cfg.ingest.mode, cfg.ingest.stream_key) == ("stream", "app:ev")


@pytest.mark.parametrize(
    "overrides",
    [
        ["auth.mode=jwt", "auth.jwt.secret=0123456789abcdef0123456789abcdef"],
        ["auth.mode=callback", "auth.callback.url=http://app/auth"],
        ["auth.mode=laravel"],
    ],
)
def test_every_auth_mode_is_supported(overrides: list[str]) -> None:
    assert load_config(None, env={}, overrides=overrides).auth.mode == overrides[0].split("=")[1]


@pytest.mark.parametrize(
    "overrides",
    [
        ["ingest.format=laravel"],
        ["server.workers=4"],
        ["redis.sentinels=['s1:26379']", "redis.sentinel_master=mymaster"],
    ],
)
def test_laravel_workers_and_sentinel_are_supported(overrides: list[str]) -> None:
    load_config(None, env={}, overrides=overrides)


# --------------------------------------------------------------------------- secrets


SECRETS = [
    "redis.url=redis://app:hunter2-redis@redis.internal:6379/0",
    "auth.jwt.secret=hunter2-jwt",
    "auth.callback.key=hunter2-callback",
    "publish.keys=['hunter2-publish-a', 'hunter2-publish-b']",
]


def test_secrets_absent_from_repr_and_dump() -> None:
    cfg = load(overrides=SECRETS)
    assert cfg.auth.jwt.secret == "hunter2-jwt"  # the value itself is kept
    for text in (repr(cfg), str(cfg), repr(cfg.redis), repr(cfg.auth), dump_config(cfg)):
        assert "hunter2" not in text
    dumped = tomllib.loads(dump_config(cfg))
    assert dumped["redis"]["url"] == "redis://app:***@redis.internal:6379/0"
    assert dumped["auth"]["jwt"]["secret"] == "***"
    assert dumped["auth"]["callback"]["key"] == "***"
    assert dumped["publish"]["keys"] == ["***", "***"]
    assert "url='redis://app:***@redis.internal:6379/0'" in repr(cfg.redis)
    assert redact_url(cfg.redis.url) == "redis://app:***@redis.internal:6379/0"


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:p%40ss@h/1", "rediss://user:***@h/1"),
        ("unix:///run/redis.sock?db=0&password=pw", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redis_url_redaction(url: str, safe: str) -> None:
    cfg = load(overrides=[f"redis.url={url}"])
    assert redact_url(cfg.redis.url) == safe
    assert "pw" not in repr(cfg) or "pw" in safe


def test_empty_secrets_are_dumped_empty_not_starred() -> None:
    dumped = tomllib.loads(dump_config(load()))
    assert dumped["auth"]["jwt"]["secret"] == ""
    assert dumped["publish"]["keys"] == []


def test_secret_type_errors_do_not_echo_the_value() -> None:
    message = config_error(overrides=["publish.keys=hunter2"])
    assert "publish.keys: expected an array of strings" in message
    assert "hunter2" not in message
    message = config_error(overrides=["redis.url=http://u:hunter2@h"])
    assert "hunter2" not in message


# --------------------------------------------------------------------------- dump


def test_dump_round_trips_through_load(tmp_path: Path) -> None:
    original = load(
        overrides=[
            "server.listen=[::1]:8081",
            "server.cors_origins=['https://*.example.com', 'http://localhost:3000']",
            "server.trusted_proxies=['10.0.0.0/8']",
            "admin.listen=",
            "ingest.prefix=",
            'auth.grants=["tenant.{tenant}.*", "user.{user}"]',
            'auth.jwt.audience="quote\\"back\\\\slash tab\\tnl\\ndel\\u007fctl\\u0001 \u00e9"',
            "auth.public_channels=['status.*']",
            "auth.callback.timeout_seconds=0.25",
            "auth.laravel.timeout_seconds=3",
            "limits.max_event_bytes=1024",
            "log.format=json",
        ]
    )
    assert original.auth.jwt.audience == 'quote"back\\slash tab\tnl\ndel\x7fctl\x01 \u00e9'
    path = tmp_path / "dumped.toml"
    path.write_text(dump_config(original))
    reloaded = load_config(path, env={})
    assert dataclasses.replace(reloaded, source=None) == original


def test_dump_of_defaults_round_trips_and_shows_unset_public_channels(tmp_path: Path) -> None:
    text = dump_config(load())
    assert '# public_channels = ["*"]' in text
    path = tmp_path / "d.toml"
    path.write_text(text)
    assert load_config(path, env={}).auth.public_channels is None


def test_dump_names_the_source_file(tmp_path: Path) -> None:
    cfg = load("[log]\nlevel = 'debug'\n", tmp_path)
    assert str(tmp_path / "broker.toml") in dump_config(cfg).splitlines()[1]


# --------------------------------------------------------------------------- auth helpers, warnings


@pytest.mark.parametrize(
    ("mode", "public", "expected"),
    [
        ("none", None, ("*",)),
        ("jwt", None, ()),
        ("callback", None, ()),
        ("none", ("status",), ("status",)),
        ("jwt", ("status.*",), ("status.*",)),
        ("laravel", (), ()),
    ],
)
def test_effective_public_channels(
    mode: Literal["none", "jwt", "callback", "laravel"],
    public: tuple[str, ...] | None,
    expected: tuple[str, ...],
) -> None:
    auth = dataclasses.replace(Config().auth, mode=mode, public_channels=public)
    assert auth.effective_public_channels == expected


def warnings_for(**sections: dict[str, Any]) -> list[str]:
    cfg = Config()
    for name, changes in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **changes)})
    return config_warnings(cfg)


def test_auth_none_warns_loudly() -> None:
    (warning,) = warnings_for()
    assert "AUTH IS OFF" in warning
    assert "anyone" in warning


def test_no_auth_warning_with_real_auth() -> None:
    assert warnings_for(auth={"mode": "jwt", "jwt": Config().auth.jwt}) == []


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"server": {"workers": 4}}, "server.workers = 4 with ingest.mode = 'pubsub'"),
        ({"sse": {"heartbeat_seconds": 60}}, "sse.heartbeat_seconds = 60"),
        ({"admin": {"listen": "0.0.0.0:9464"}}, "admin.listen"),
        ({"auth": {"mode": "jwt", "public_channels": ("*",)}}, "auth.public_channels contains"),
        ({"limits": {"write_buffer_bytes": 4096}}, "slow consumer"),
        ({"replay": {"max_events": 0}}, "every resume resets"),
        ({"admin": {"listen": ""}, "publish": {"keys": ("k",)}}, "POST /publish is off"),
    ],
)
def test_risky_settings_warn(sections: dict[str, dict[str, Any]], needle: str) -> None:
    assert any(needle in w for w in warnings_for(**sections))


@pytest.mark.parametrize(
    "sections",
    [
        {"sse": {"heartbeat_seconds": 59}},
        {"server": {"workers": 4}, "ingest": {"mode": "stream"}},
        {"admin": {"listen": "[::1]:9464"}},
        {"admin": {"listen": "unix:/run/admin.sock"}},
    ],
)
def test_safe_settings_do_not_warn_beyond_auth_none(sections: dict[str, dict[str, Any]]) -> None:
    assert len(warnings_for(**sections)) == 1  # only the auth-none warning


# --------------------------------------------------------------------------- shipped file


def test_shipped_broker_toml_loads_to_the_defaults() -> None:
    cfg = load_config(SHIPPED, env={})
    assert dataclasses.replace(cfg, source=None) == Config()


def test_shipped_broker_toml_documents_every_key() -> None:
    documented: list[str] = []
    section = ""
    for line in SHIPPED.read_text().splitlines():
        if m := re.match(r"^\[([a-z_.]+)\]$", line):
            section = m[1]
        elif m := re.match(r"^#? ?([a-z_]+) = ", line):
            documented.append(f"{section}.{m[1]}")
    assert documented == list(KEYS)  # every key, once, in order
    assert "# public_channels = " in SHIPPED.read_text()  # shown, but left unset
