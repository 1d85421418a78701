"""Channel grants: glob patterns with ``{user}`` and ``{tenant}`` placeholders."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from broker.errors import Forbidden

# Private and presence channels (Laravel's prefixes): public patterns never
# open them, whatever they say; in laravel mode the app is asked about each.
PROTECTED = ("private-", "presence-")

# fnmatch treats these as syntax; inside brackets each one is a literal.
_GLOB_ESCAPES = str.maketrans({"*": "[*]", "?": "[?]", "[": "[[]"})


def escape_glob(value: str) -> str:
    """``value`` as a pattern matching only itself: a user id ``*`` widens nothing."""
    return value.translate(_GLOB_ESCAPES)


PLACEHOLDER = re.compile(r"\{(user|tenant)\}")
_WILDCARDS = frozenset("*?[")


def crossing_problem(pattern: str) -> str | None:
    """Why ``pattern`` can never be safe, whatever the ids: a placeholder directly
    followed by a wildcard (``tenant.{tenant}*``) lets tenant ``a`` match tenant
    ``ab``'s channels. None when the pattern is fine."""
    for match in PLACEHOLDER.finditer(pattern):
        rest = pattern[match.end() :]
        if _WILDCARDS & set(rest) and (not rest or rest[0] in "*?[{"):
            return (
                f"{match.group(0)} is followed by a wildcard or another placeholder, so one "
                "identity's channels would match another's; put a separator after it "
                "(e.g. 'tenant.{tenant}.*')"
            )
    return None


def expand(patterns: Iterable[str], user: str | None, tenant: str | None) -> list[str]:
    """Patterns with ``{user}``/``{tenant}`` filled in, in one pass (a user id that
    reads ``{tenant}`` stays literal), each value escaped (a ``*`` widens nothing).

    A pattern naming a placeholder the identity lacks grants nothing and is
    dropped (``user.{user}`` for a connection without a user is not ``user.``).

    Ids may contain the characters channel names use as separators, so
    ``tenant.{tenant}.*`` for tenant ``a`` would also match tenant ``a.b``'s
    channels. Such an identity is refused instead (Forbidden,
    ``ambiguous_identity``): when a wildcard follows a placeholder, its value
    must not contain the separator right after the placeholder. ``user.{user}``
    (no wildcard after it) takes any id.
    """
    values = {"user": user, "tenant": tenant}
    out: list[str] = []
    for pattern in patterns:
        names = PLACEHOLDER.findall(pattern)
        if not names:
            out.append(pattern)
            continue
        if not all(values[name] for name in names):
            continue
        for match in PLACEHOLDER.finditer(pattern):
            value = values[match.group(1)] or ""
            rest = pattern[match.end() :]
            if not _WILDCARDS & set(rest):
                continue
            separator = rest[:1]
            if separator in ("", "*", "?", "[", "{") or separator in value:
                raise Forbidden(
                    f"the {match.group(1)} id {value[:64]!r} contains {separator or 'nothing'!r}, "
                    f"so grant {pattern!r} would also match other identities' channels",
                    code="ambiguous_identity",
                )
        out.append(PLACEHOLDER.sub(lambda m: escape_glob(values[m.group(1)] or ""), pattern))
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
    return not channel.startswith(PROTECTED) and public.allows(channel)
