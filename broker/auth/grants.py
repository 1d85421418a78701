"""Channel grants: glob patterns with ``{user}`` and ``{tenant}`` placeholders."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

# Public patterns never open private or presence channels, whatever they say.
_PROTECTED = ("private-", "presence-")

# fnmatch treats these as syntax; inside brackets each one is a literal.
_GLOB_ESCAPES = str.maketrans({"*": "[*]", "?": "[?]", "[": "[[]"})


def escape_glob(value: str) -> str:
    """``value`` as a pattern matching only itself: a user id ``*`` widens nothing."""
    return value.translate(_GLOB_ESCAPES)


def expand(patterns: Iterable[str], user: str | None, tenant: str | None) -> list[str]:
    """Patterns with ``{user}``/``{tenant}`` filled in (escaped).

    A pattern naming a placeholder the identity lacks grants nothing and is
    dropped (``user.{user}`` for a connection without a user is not ``user.``).
    """
    out: list[str] = []
    for pattern in patterns:
        if "{user}" in pattern:
            if not user:
                continue
            pattern = pattern.replace("{user}", escape_glob(user))
        if "{tenant}" in pattern:
            if not tenant:
                continue
            pattern = pattern.replace("{tenant}", escape_glob(tenant))
        out.append(pattern)
    return out


@dataclass(frozen=True, slots=True)
class Grants:
    """A compiled set of glob patterns (``*`` any run of characters, ``?`` one)."""

    patterns: tuple[str, ...]
    regex: re.Pattern[str] | None

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> Grants:
        pats = tuple(dict.fromkeys(patterns))
        if not pats:
            return cls((), None)
        return cls(pats, re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats)))

    def allows(self, channel: str) -> bool:
        return self.regex is not None and self.regex.match(channel) is not None


NO_GRANTS = Grants.compile(())


def public_allows(public: Grants, channel: str) -> bool:
    """Whether ``channel`` is open to anyone: never for ``private-*`` / ``presence-*``."""
    return not channel.startswith(_PROTECTED) and public.allows(channel)
