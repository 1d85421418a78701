"""How a section declares its keys: each field with its default and its check.

A key is a dataclass field made by :func:`setting` or :func:`secret`, so its
name, type, default and check are written once, in one line, in the section
that owns it. :func:`keys_of` walks the sections into the table of dotted keys
the loader, the environment names and the dump are derived from.

A check returns None for a good value, else the problem ("must be >= 1, got 0"),
which names the rule and quotes the value (never a secret); the loader puts the
key in front and the value's source after. The checks several sections use are
here; the others live beside the one field they check.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

from broker.config.text import describe

Check = Callable[[Any], str | None]


def between(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}, got {v}"


def at_least(low: int) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}, got {v}"


def zero_or_at_least(low: int) -> Check:
    return lambda v: None if v == 0 or v >= low else f"must be 0 (never) or >= {low}, got {v}"


def seconds(high: float) -> Check:
    return lambda v: None if 0 < v <= high else f"must be > 0 and <= {high:g}, got {v:g}"


def one_of(*choices: str) -> Check:
    """The value must be one of ``choices`` (the check of every ``Literal`` key)."""
    allowed = " | ".join(choices)
    return lambda v: None if v in choices else f"must be one of {allowed}, got {describe(v)}"


def each(check: Check) -> Check:
    """``check`` for every entry of an array; the first problem found."""

    def run(values: tuple[str, ...]) -> str | None:
        for v in values:
            if (problem := check(v)) is not None:
                return problem
        return None

    return run


def non_empty(v: str) -> str | None:
    return None if v else "must not be empty"


def parses(parse: Callable[[str], object], *, allow_empty: bool = False) -> Check:
    """The value must parse: the parser's ValueError is the problem."""

    def run(v: str) -> str | None:
        if allow_empty and v == "":
            return None
        try:
            parse(v)
        except ValueError as exc:
            return str(exc)
        return None

    return run


# A rule spanning keys that a config breaks: (key, problem, key whose source to blame).
Problem = tuple[str, str, str]


def setting(default: Any, check: Check | None = None) -> Any:
    """A key: its default and the check a provided value must pass.

    A ``Literal[...]`` type needs no check: the value must be one of its strings.
    """
    return field(default=default, metadata={"key": True, "check": check})


def secret(default: Any, check: Check | None = None) -> Any:
    """A key whose value is never shown: ``***`` in reprs, dumps and error messages."""
    # repr=False keeps the value out of the generated repr even if someone drops
    # the hand-written __repr__; the metadata drives redaction in dumps and errors.
    return field(
        default=default, repr=False, metadata={"key": True, "check": check, "secret": True}
    )


class Parsed:
    """Base of a section that keeps values parsed from its keys (a listen address).

    A subclass names them in ``__slots__``: slots, not fields, so they are no
    keys and a section compares, prints and reloads by its keys alone. The
    section's ``__post_init__`` sets them, so every way of making one (the
    loader, ``replace()``, a copy) parses once and stores the result.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[type[Parsed], tuple[Any, ...]]:
        # Rebuild through __init__ (and so __post_init__): the dataclass's own
        # pickle state would carry the fields only, not the parsed slots.
        names = getattr(self, "__dataclass_fields__", {})
        return (type(self), tuple(getattr(self, name) for name in names))


@dataclass(frozen=True, slots=True)
class Key:
    """One dotted key: how to read a provided value and how to check it."""

    kind: str  # int | float | str | bool | strs | opt_strs
    secret: bool
    check: Check | None


_KINDS: dict[object, str] = {
    int: "int",
    float: "float",
    str: "str",
    bool: "bool",
    tuple[str, ...]: "strs",
    tuple[str, ...] | None: "opt_strs",
}


def _key(hint: object, meta: typing.Mapping[str, Any]) -> Key:
    check: Check | None = meta["check"]
    if typing.get_origin(hint) is Literal:
        return Key("str", bool(meta.get("secret")), check or one_of(*typing.get_args(hint)))
    return Key(_KINDS[hint], bool(meta.get("secret")), check)


def keys_of(cls: type[Any], prefix: str = "") -> tuple[dict[str, Key], dict[str, type[Any]]]:
    """Every key under ``cls`` by dotted name, and every table, both in declaration order."""
    keys: dict[str, Key] = {}
    tables: dict[str, type[Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        hint = hints[f.name]
        if isinstance(hint, type) and is_dataclass(hint):
            tables[path] = hint
            sub_keys, sub_tables = keys_of(hint, path)
            keys.update(sub_keys)
            tables.update(sub_tables)
        elif f.metadata.get("key"):
            keys[path] = _key(hint, f.metadata)
        elif f.metadata.get("key") is not False:
            raise TypeError(f"{path}: declare it with setting() or secret(), or key=False")
    return keys, tables
