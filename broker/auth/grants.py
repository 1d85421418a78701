"""Channel grants: glob patterns, checked per requested channel."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

# Public patterns never open private or presence channels, whatever they say.
_PROTECTED = ("private-", "presence-")


@dataclass(frozen=True, slots=True)
class Grants:
    """A compiled set of glob patterns (``*`` any run of characters, ``?`` one)."""

    patterns: tuple[str, ...]
    regex: re.Pattern[str] | None

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> Grants:
        pats = tuple(patterns)
        if not pats:
            return cls((), None)
        return cls(pats, re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats)))

    def allows(self, channel: str) -> bool:
        return self.regex is not None and self.regex.match(channel) is not None


def public_allows(public: Grants, channel: str) -> bool:
    """Whether ``channel`` is open to anyone: never for ``private-*`` / ``presence-*``."""
    return not channel.startswith(_PROTECTED) and public.allows(channel)
