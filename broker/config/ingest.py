"""How events come in and how long they are kept: ``[ingest]``, ``[replay]``, ``[publish]``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from broker.config.schema import Problem, at_least, between, non_empty, secret, setting
from broker.config.text import safe_repr


@dataclass(frozen=True, slots=True)
class IngestConfig:
    mode: Literal["pubsub", "stream", "bridge"] = setting("pubsub")
    format: Literal["native", "laravel"] = setting("native")
    prefix: str = setting("sse:")
    stream_key: str = setting("sse:stream", non_empty)
    canary_interval_seconds: int = setting(5, between(0, 3600))
    bridge_lease_seconds: int = setting(3, between(1, 60))
    bridge_buffer_seconds: int = setting(10, between(2, 600))
    bridge_buffer_events: int = setting(100000, between(1000, 10000000))

    def problems(self) -> Iterator[Problem]:
        if self.mode == "stream" and self.format == "laravel":
            # Laravel's broadcaster PUBLISHes; there is no stream for the broker to read.
            yield (
                "ingest.format",
                "'laravel' requires ingest.mode = 'pubsub' or 'bridge'",
                "ingest.format",
            )


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    ttl_seconds: int = setting(300, at_least(1))
    max_events: int = setting(10000, at_least(0))
    max_bytes: int = setting(67108864, at_least(0))
    max_retained_keys: int = setting(100000, at_least(0))
    max_retained_bytes: int = setting(67108864, at_least(0))
    max_resume_scan: int = setting(20000, at_least(0))
    max_concurrent_scans: int = setting(4, between(1, 1000))


def _publish_keys(v: tuple[str, ...]) -> str | None:
    return None if all(v) else "entries must be non-empty strings"


@dataclass(frozen=True, slots=True)
class PublishConfig:
    keys: tuple[str, ...] = secret((), _publish_keys)
    keys_file: str = setting("")

    __repr__ = safe_repr
