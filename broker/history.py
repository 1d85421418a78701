"""Replay history and retained state, in process memory.

History: per-channel deques of published events, bounded globally by
``replay.max_events``, ``replay.max_bytes`` and ``replay.ttl_seconds``. When a
count or byte bound is hit, the channel holding the most events loses its
oldest first (an O(1) lookup through count buckets), so a noisy channel
cannot erase a quiet one's history. Each channel remembers the newest
sequence it ever evicted: a resume is exact for that channel when nothing
after the client's position was evicted, however old the position is.

Retained state: the latest event per (channel, tenant, key), bounded by
``replay.max_retained_keys`` and ``replay.max_retained_bytes``; past a bound a
new key is not retained (the event is still delivered live) and counted.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator

from broker.config import Config
from broker.envelope import Published
from broker.metrics import Stats
from broker.positions import Position

# Python objects per history entry (Published, Event, bytes headers, deque
# slot) beyond the frame bytes themselves; counted against max_bytes so the
# bound reflects real memory, not only payloads.
ENTRY_OVERHEAD = 400

# Channels whose history emptied are remembered (their newest evicted seq)
# up to this many; past it, the oldest are folded into one global mark.
MAX_EMPTY_CHANNELS = 100_000


def entry_size(pub: Published) -> int:
    return pub.size + ENTRY_OVERHEAD


class _Log:
    __slots__ = ("entries", "evicted_upto")

    def __init__(self, evicted_upto: int) -> None:
        self.entries: deque[Published] = deque()
        self.evicted_upto = evicted_upto


class History:
    """The replay window of one process (pubsub mode) or one instance's cache (stream mode)."""

    def __init__(
        self,
        *,
        ttl_seconds: float,
        max_events: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl_seconds
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._clock = clock
        self._logs: dict[str, _Log] = {}
        self._empty: OrderedDict[str, int] = OrderedDict()  # channel -> evicted_upto
        self._forgotten_upto = 0
        self._by_count: dict[int, dict[str, None]] = {}
        self._max_count = 0
        self.events = 0
        self.bytes = 0
        self.evicted = 0
        self.last_hole = 0  # newest seq that stands for events lost in an outage
        self._holes: dict[str, int] = {}  # the same, for channels that lost events alone

    def configure(self, cfg: Config) -> None:
        self.ttl = cfg.replay.ttl_seconds
        self.max_events = cfg.replay.max_events
        self.max_bytes = cfg.replay.max_bytes

    # -- per-channel counts, bucketed so the biggest channel is found in O(1) ---
    # Inlined on the hot path: append runs once per ingested event.

    def append(self, pub: Published) -> None:
        """Record ``pub`` (the newest event) and enforce the bounds."""
        channel = pub.event.channel
        log = self._logs.get(channel)
        if log is None:
            upto = self._empty.pop(channel, self._forgotten_upto)
            log = self._logs[channel] = _Log(upto)
        entries = log.entries
        entries.append(pub)
        n = len(entries)
        by_count = self._by_count
        if n > 1:
            below = by_count[n - 1]
            del below[channel]
            if not below:
                del by_count[n - 1]
        bucket = by_count.get(n)
        if bucket is None:
            by_count[n] = {channel: None}
        else:
            bucket[channel] = None
        if n > self._max_count:
            self._max_count = n
        self.events += 1
        self.bytes += pub.size + ENTRY_OVERHEAD
        while self.events > self.max_events or self.bytes > self.max_bytes:
            self._evict_from(next(iter(by_count[self._max_count])))

    def _evict_from(self, channel: str) -> None:
        log = self._logs[channel]
        entries = log.entries
        pub = entries.popleft()
        log.evicted_upto = pub.seq
        n = len(entries)
        by_count = self._by_count
        bucket = by_count[n + 1]
        del bucket[channel]
        if not bucket:
            del by_count[n + 1]
            if self._max_count == n + 1:
                self._max_count = n  # the channel itself now sits one lower
        if n:
            by_count.setdefault(n, {})[channel] = None
        self.events -= 1
        self.bytes -= pub.size + ENTRY_OVERHEAD
        self.evicted += 1
        if not n:
            del self._logs[channel]
            self._empty[channel] = log.evicted_upto
            if len(self._empty) > MAX_EMPTY_CHANNELS:
                _, upto = self._empty.popitem(last=False)
                self._forgotten_upto = max(self._forgotten_upto, upto)

    def expire(self) -> int:
        """Drop events older than the TTL (called by a shared timer); returns how many."""
        cutoff = self._clock() - self.ttl
        before = self.evicted
        for channel in list(self._logs):
            entries = self._logs[channel].entries
            while entries and entries[0].ingested_at < cutoff:
                self._evict_from(channel)
                if channel not in self._logs:
                    break
        return self.evicted - before

    def mark_hole(self, seq: int, channels: Iterable[str] | None = None) -> None:
        """Events of ``channels`` (None: every channel) were lost just before ``seq``
        (an outage): resumes across it reset."""
        if channels is None:
            self.last_hole = max(self.last_hole, seq)
            return
        holes = self._holes
        for channel in channels:
            holes[channel] = max(holes.get(channel, 0), seq)
        if len(holes) > MAX_EMPTY_CHANNELS:
            # Too many to remember one by one: one hole for every channel
            # (more resets than needed, never a resume across a hole).
            self.last_hole = max(self.last_hole, *holes.values())
            holes.clear()

    # -- reading ------------------------------------------------------------------

    def lost_after(self, channels: Iterable[str], position: int | Position) -> str | None:
        """Why a client at ``position`` cannot resume exactly, or None when it can."""
        if isinstance(position, int) and self.last_hole > position:
            return "outage"  # a hole of every channel, whichever the client reads
        at = _per_channel(position)
        holes = self._holes
        for channel in channels:
            seq = at(channel)
            if self.last_hole > seq or holes.get(channel, 0) > seq:
                return "outage"
        for channel in channels:
            seq = at(channel)
            log = self._logs.get(channel)
            upto = log.evicted_upto if log else self._empty.get(channel, self._forgotten_upto)
            if upto > seq:
                return "expired"
        return None

    def since(
        self, channels: Iterable[str], position: int | Position, upto: int | Position
    ) -> list[Published]:
        """Events of ``channels`` after ``position`` up to ``upto``, oldest first
        (check ``lost_after``)."""
        after, until = _per_channel(position), _per_channel(upto)
        runs: list[list[Published]] = []
        for channel in channels:
            log = self._logs.get(channel)
            if log is None:
                continue
            seq, last = after(channel), until(channel)
            run: list[Published] = []
            for pub in reversed(log.entries):
                if pub.seq <= seq:
                    break
                if pub.seq <= last:
                    run.append(pub)
            if run:
                run.reverse()
                runs.append(run)
        if len(runs) == 1:
            return runs[0]
        return list(heapq.merge(*runs, key=_seq))


def _per_channel(position: int | Position) -> Callable[[str], int]:
    if isinstance(position, int):
        return lambda channel: position
    return position.at


def _seq(pub: Published) -> int:
    return pub.seq


class RetainedState:
    """The latest event per (channel, tenant, key); tenant None = every tenant of the channel."""

    def __init__(
        self, *, max_keys: int, max_bytes: int, stats: Stats, tombstones: bool = False
    ) -> None:
        self.max_keys = max_keys
        self.stats = stats
        self.max_bytes = max_bytes
        # Stream mode merges this with the state in Redis: a deletion must
        # stay visible (as a tombstone) until then, or Redis's older value
        # would come back.
        self.tombstones = tombstones
        self._by_scope: dict[tuple[str, str | None], dict[str, Published]] = {}
        self.keys = 0
        self.bytes = 0

    def configure(self, cfg: Config) -> None:
        self.max_keys = cfg.replay.max_retained_keys
        self.max_bytes = cfg.replay.max_retained_bytes

    def apply(self, pub: Published) -> bool:
        """Record or delete the key ``pub`` retains; False when a bound refused a new key."""
        event = pub.event
        key = event.retain
        if key is None:
            return True
        scope = (event.channel, event.tenant)
        entries = self._by_scope.get(scope)
        old = entries.get(key) if entries else None
        if event.deletes and not self.tombstones:
            if old is not None and entries is not None:
                self._drop(scope, entries, key, old)
            return True
        size = entry_size(pub)
        grow = size - (entry_size(old) if old is not None else 0)
        if (old is None and self.keys >= self.max_keys) or self.bytes + grow > self.max_bytes:
            self.stats.retained_refused += 1
            if old is not None and entries is not None:
                # Keeping the previous value would serve stale state as current.
                self._drop(scope, entries, key, old)
            return False
        if entries is None:
            entries = self._by_scope[scope] = {}
        if old is None:
            self.keys += 1
        entries[key] = pub
        self.bytes += grow
        return True

    def _drop(
        self, scope: tuple[str, str | None], entries: dict[str, Published], key: str, old: Published
    ) -> None:
        del entries[key]
        self.keys -= 1
        self.bytes -= entry_size(old)
        if not entries:
            del self._by_scope[scope]

    def snapshot(self, channels: Iterable[str], tenant: str | None) -> list[Published]:
        """Retained events of ``channels`` visible to ``tenant``, in publish order
        (tombstones included when kept: callers merging with Redis need them)."""
        found: list[Published] = []
        for channel in channels:
            found.extend(self._scope(channel, None))
            if tenant is not None:
                found.extend(self._scope(channel, tenant))
        found.sort(key=_seq)
        return found

    def _scope(self, channel: str, tenant: str | None) -> Iterator[Published]:
        entries = self._by_scope.get((channel, tenant))
        return iter(entries.values()) if entries else iter(())
