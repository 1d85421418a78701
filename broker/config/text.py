"""How config values are shown: TOML text (the dump, quotes in error messages), and
secrets as ``***`` (reprs, dumps, error messages)."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_str(text: str) -> str:
    """``text`` as a TOML basic string: quoted, every control character escaped."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    """A bool, number, string or array of them as TOML; TypeError for anything else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return toml_str(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def describe(value: Any, *, secret: bool = False) -> str:
    """A short rendering of a bad value for an error message; never a secret."""
    if isinstance(value, dict):
        return "a table"
    if secret or not isinstance(value, str | int | float | bool | list | tuple):
        return f"a {type(value).__name__}" + (" (value hidden)" if secret else "")
    try:
        text = toml_value(value)
    except TypeError:
        return "an array of mixed values"
    return text if len(text) <= 80 else text[:77] + "..."


REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` with any password (userinfo or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc, query = parts.netloc, parts.query
    if not parts.password and "password" not in query:
        return url  # untouched: rebuilding could change how it is spelled
    if parts.password:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{REDACTED}@{hostinfo}"
    if "password" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if k == "password" else v) for k, v in pairs], safe="*")
    # Not urlunsplit: it turns "unix:///path" into "unix:/path".
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
    return (
        rebuilt + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    )


def redact(key: str, value: Any) -> Any:
    """The secret ``value`` of ``key`` as it may be shown: URLs keep all but the password."""
    if key.endswith(".url") and isinstance(value, str):
        return redact_url(value)
    if isinstance(value, tuple):
        return tuple(REDACTED for _ in value)
    return REDACTED if value else value


def safe_repr(self: Any) -> str:
    """``__repr__`` for a section holding secrets: theirs redacted, the rest as usual."""
    parts = []
    for f in fields(self):
        value = getattr(self, f.name)
        if f.metadata.get("secret"):
            value = redact(f"{type(self).__name__}.{f.name}", value)
        parts.append(f"{f.name}={value!r}")
    return f"{type(self).__name__}({', '.join(parts)})"
