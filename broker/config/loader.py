"""Loading: the TOML file, ``SSE_BROKER_*`` variables and ``--set``, checked key by key.

Every problem found is reported at once, one line each, naming the key and
where its value came from (the file, the variable, ``--set``).
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from broker.config.model import KEYS, TABLES, Config
from broker.config.schema import Key
from broker.config.text import describe
from broker.errors import ConfigError

ENV_PREFIX = "SSE_BROKER_"
# Read by the CLI, not a key: it names the file that holds the keys.
ENV_CONFIG = "SSE_BROKER_CONFIG"
# Set by the worker supervisor for the processes it starts (not a config key).
ENV_WORKER = "SSE_BROKER_WORKER"


def env_var(key: str) -> str:
    """The variable overriding a dotted key: ``redis.url`` -> ``SSE_BROKER_REDIS_URL``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


_ENV_KEYS = {env_var(key): key for key in KEYS}
if len(_ENV_KEYS) != len(KEYS) or ENV_CONFIG in _ENV_KEYS:
    raise RuntimeError("two config keys map to the same SSE_BROKER_* variable")

# A value as provided: (dotted key, raw value, where it came from).
Provided = tuple[str, Any, str]


class _Invalid(ValueError):
    pass


def _convert(spec: Key, raw: Any) -> Any:
    got = describe(raw, secret=spec.secret)
    if spec.kind == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        raise _Invalid(f"expected an integer, got {got}")
    if spec.kind == "float":
        if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
            return float(raw)
        raise _Invalid(f"expected a number, got {got}")
    if spec.kind == "str":
        if isinstance(raw, str):
            return raw
        raise _Invalid(f"expected a string, got {got}")
    if spec.kind == "bool":
        if isinstance(raw, bool):
            return raw
        raise _Invalid(f"expected true or false, got {got}")
    if isinstance(raw, list) and all(isinstance(v, str) for v in raw):
        return tuple(raw)
    raise _Invalid(f'expected an array of strings like ["a", "b"], got {got}')


def _parse_text(key: str, raw: str) -> Any:
    """An env or ``--set`` value: TOML value syntax, else the raw text as a string."""
    try:
        doc = tomllib.loads(f"x = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    if doc.keys() != {"x"}:  # a newline in the value smuggled in another key
        return raw
    value = doc["x"]
    if KEYS[key].kind == "str" and not isinstance(value, str):
        return raw
    return value


def _suggest(name: str, candidates: Sequence[str], prefix: str = "") -> str:
    """``, did you mean "x"?`` for the closest candidate, or ""; matching ignores ``prefix``."""
    name = name.removeprefix(prefix)
    names = [c.removeprefix(prefix) for c in candidates]
    leaf = name.rsplit(".", 1)[-1]
    # A known key in the wrong section is the likeliest mistake; difflib covers typos.
    same_leaf = [c for c in names if c.rsplit(".", 1)[-1] == leaf]
    close = same_leaf if len(same_leaf) == 1 else difflib.get_close_matches(name, names, n=1)
    return f', did you mean "{prefix}{close[0]}"?' if close else ""


def _walk_file(
    table: dict[str, Any], prefix: str, origin: str, out: list[Provided], errors: list[str]
) -> None:
    for name, value in table.items():
        path = f"{prefix}.{name}" if prefix else name
        if path in TABLES:
            if isinstance(value, dict):
                _walk_file(value, path, origin, out, errors)
            else:
                errors.append(
                    f"{path}: expected a table [{path}], got {describe(value)} (from {origin})"
                )
        elif path in KEYS:
            out.append((path, value, origin))
        else:
            what = "section" if isinstance(value, dict) else "key"
            hint = _suggest(path, [*KEYS, *TABLES])
            errors.append(f"{path}: unknown {what}{hint} (from {origin})")


def _read_file(path: str, errors: list[str]) -> list[Provided]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    out: list[Provided] = []
    _walk_file(doc, "", path, out, errors)
    return out


def _read_env(env: Mapping[str, str], errors: list[str]) -> list[Provided]:
    out: list[Provided] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in (ENV_CONFIG, ENV_WORKER):
            continue
        key = _ENV_KEYS.get(name)
        if key is None:
            hint = _suggest(name, list(_ENV_KEYS), ENV_PREFIX)
            errors.append(f"{name}: unknown environment variable, no such config key{hint}")
        else:
            out.append((key, _parse_text(key, env[name]), name))
    return out


def _read_overrides(overrides: Sequence[str], errors: list[str]) -> list[Provided]:
    out: list[Provided] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            errors.append(f"--set {describe(item)}: expected section.key=value")
        elif key in TABLES:
            errors.append(f"{key}: is a section, set its keys one by one (from --set)")
        elif key not in KEYS:
            errors.append(f"{key}: unknown key{_suggest(key, list(KEYS))} (from --set)")
        else:
            # Typed by hand: "--set 'log.level = debug'" means "debug".
            out.append((key, _parse_text(key, raw.strip()), "--set"))
    return out


def _fail(errors: list[str]) -> None:
    if errors:
        raise ConfigError("\n".join(errors))


def read_config_file(key: str, path: str) -> str:
    """The text of a file a config key names (secrets, keys); ConfigError naming the key."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Load, validate and return the effective config.

    Precedence: ``overrides`` (``section.key=value``) > ``SSE_BROKER_*`` env >
    the TOML file > defaults. ``env=None`` reads ``os.environ``; ``SSE_BROKER_CONFIG``
    is ignored here (the CLI turns it into ``path``). Every problem found is
    reported in one ConfigError, one line each, naming the key and its source.
    """
    source = os.fspath(path) if path is not None else None
    errors: list[str] = []
    provided = _read_file(source, errors) if source is not None else []
    provided += _read_env(os.environ if env is None else env, errors)
    provided += _read_overrides(overrides, errors)

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    # Every provided value is checked, even one a later source overrides, so
    # `check-config FILE` gives the same verdict whatever the environment says.
    for key, raw, origin in provided:
        spec = KEYS[key]
        try:
            value = _convert(spec, raw)
        except _Invalid as exc:
            errors.append(f"{key}: {exc} (from {origin})")
            continue
        if spec.check is not None and (problem := spec.check(value)) is not None:
            errors.append(f"{key}: {problem} (from {origin})")
            continue
        values[key] = value
        origins[key] = origin
    _fail(errors)

    built: Config = _build(Config, "", values)
    cfg = replace(built, source=source)
    for key, problem, blame in cfg.problems():
        blamed = origins.get(blame) or origins.get(key)
        errors.append(f"{key}: {problem}" + (f" (from {blamed})" if blamed else ""))
    _fail(errors)
    return cfg


def _build(cls: type[Any], prefix: str, values: Mapping[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if path in TABLES:
            kwargs[f.name] = _build(TABLES[path], path, values)
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)
