"""Replay history bounds as tables (broker/history.py), beside tests/test_history.py.

What test_history.py does not already pin down: eviction across several
channels as the biggest one changes over time, the byte bound taking from the
channel with the most *events* (not the most bytes), TTL expiry channel by
channel at its exact boundary, the count buckets staying right after a TTL
expiry, and, for every scenario, ``lost_after`` and ``since`` checked at
every position and for every set of channels against their rule.

Each row's ``kept`` is worked out by hand from the rule ("over a bound, the
channel holding the most events loses its oldest"; "older than now - ttl
expires"); the rest is derived from ``kept``.
"""

from __future__ import annotations

from itertools import chain, combinations

import pytest

from broker.envelope import Event, Published
from broker.history import History, entry_size

EPOCH = "1700000000000"
BIG = 10**12
FOREVER = 10**18
T0 = 1000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pub(channel: str, seq: int, data: str = "x", at: float = T0) -> Published:
    return Published(Event(channel, data), seq, f"{EPOCH}-{seq}", at)


S = entry_size(pub("c", 1))  # a one-digit seq, data "x": every small entry below
B = entry_size(pub("c", 6, "y" * 300))  # the big entry of the byte-bound rows
assert 2 * S < B <= 3 * S, "the byte rows below are worked out for this ratio"


def subsets(channels: list[str]) -> list[list[str]]:
    return [list(c) for c in chain.from_iterable(combinations(channels, n) for n in (1, 2, 3))]


def check_reads(
    history: History, fed: list[Published], kept: dict[str, list[int]], hole: int = 0
) -> None:
    """``lost_after`` and ``since`` for every position and set of channels, by their rule."""
    kept_seqs = {seq for seqs in kept.values() for seq in seqs}
    channels = sorted({p.event.channel for p in fed})
    lost = {
        ch: max((p.seq for p in fed if p.event.channel == ch and p.seq not in kept_seqs), default=0)
        for ch in channels
    }
    last = fed[-1].seq
    for subset in subsets(channels):
        for position in range(last + 1):
            if hole > position:
                reason = "outage"
            elif any(lost[ch] > position for ch in subset):
                reason = "expired"
            else:
                reason = None
            assert history.lost_after(subset, position) == reason, (subset, position)
            for upto in (position, last - 1, last, FOREVER):
                expected = [
                    p.seq
                    for p in fed  # fed in seq order: the expected order is the publish order
                    if p.event.channel in subset and p.seq in kept_seqs and position < p.seq <= upto
                ]
                got = history.since(subset, position, upto)
                assert [p.seq for p in got] == expected, (subset, position, upto)


# -- count and byte bounds across channels -----------------------------------------------

# ``feed``: one event per letter, seq 1, 2, ... in order; ``big`` the seqs whose
# payload is big (entry size B instead of S).
EVICTION = [
    pytest.param(
        5,
        BIG,
        "aaaaaabc",
        (),
        {"a": [4, 5, 6], "b": [7], "c": [8]},
        id="count: a dominant channel pays for the newcomers",
    ),
    pytest.param(
        6,
        BIG,
        "aaaabbbbba",
        (),
        {"a": [3, 4, 10], "b": [7, 8, 9]},
        id="count: whichever channel is biggest at the moment loses",
    ),
    pytest.param(
        4,
        BIG,
        "abcdabcd",
        (),
        {"a": [5], "b": [6], "c": [7], "d": [8]},
        id="count: each channel's newer event pushes out its own older one",
    ),
    pytest.param(
        BIG,
        B + 3 * S,
        "bmmmm",
        (1,),
        {"b": [1], "m": [3, 4, 5]},
        id="bytes: the channel with most events loses, not the one with most bytes",
    ),
    pytest.param(
        BIG,
        6 * S,
        "aaabba",
        (6,),
        {"a": [3, 6], "b": [4, 5]},
        id="bytes: a big event evicts as many of its channel's events as needed",
    ),
    pytest.param(
        4,
        2 * S + B,
        "aaba",
        (3,),
        {"a": [2, 4], "b": [3]},
        id="both bounds: bytes binds before the count does",
    ),
]


@pytest.mark.parametrize(("max_events", "max_bytes", "feed", "big", "kept"), EVICTION)
def test_bounds_evict_from_the_channel_holding_the_most_events(
    max_events: int, max_bytes: int, feed: str, big: tuple[int, ...], kept: dict[str, list[int]]
) -> None:
    history = History(ttl_seconds=300, max_events=max_events, max_bytes=max_bytes, clock=Clock())
    fed = [pub(ch, seq, "y" * 300 if seq in big else "x") for seq, ch in enumerate(feed, 1)]
    for p in fed:
        history.append(p)
        assert history.events <= max_events and history.bytes <= max_bytes
    for channel, seqs in kept.items():
        assert [p.seq for p in history.since([channel], 0, FOREVER)] == seqs, channel
    n = sum(len(seqs) for seqs in kept.values())
    assert (history.events, history.evicted) == (n, len(feed) - n)
    # B and S are the sizes of one-digit seqs; the count rows reach seq 10
    sizes = {p.seq: entry_size(p) for p in fed}
    assert all(sizes[seq] == (B if seq in big else S) for seq in sizes if seq < 10)
    assert history.bytes == sum(sizes[seq] for seqs in kept.values() for seq in seqs)
    check_reads(history, fed, kept)


# -- TTL ---------------------------------------------------------------------------------

# ``events``: (channel, seconds after T0) for seq 1, 2, ...; expire() runs at T0 + now.
TTL = [
    pytest.param(
        15,
        30,
        [("a", 0), ("b", 5), ("a", 10), ("b", 15), ("c", 20)],
        [4, 5],
        id="every channel loses exactly its events older than now - ttl",
    ),
    pytest.param(10, 20, [("a", 0), ("a", 10)], [2], id="exactly ttl old: kept"),
    pytest.param(10, 20.001, [("a", 0), ("a", 10)], [], id="a moment older: expired"),
    pytest.param(0, 20, [("a", 0), ("b", 20)], [2], id="ttl 0 keeps only the present"),
    pytest.param(100, 5, [("a", 0), ("b", 1), ("a", 2)], [1, 2, 3], id="nothing old yet"),
    pytest.param(5, 100, [("a", 0), ("b", 1), ("a", 2)], [], id="everything old"),
    pytest.param(
        10,
        12,
        [("q", 0), ("n", 5), ("n", 6), ("n", 7), ("n", 8)],
        [2, 3, 4, 5],
        id="age alone decides: a quiet channel's old event goes, the noisy one keeps its own",
    ),
]


@pytest.mark.parametrize(("ttl", "now", "events", "survivors"), TTL)
def test_ttl_expires_each_channels_old_events_at_the_exact_boundary(
    ttl: float, now: float, events: list[tuple[str, float]], survivors: list[int]
) -> None:
    clock = Clock()
    history = History(ttl_seconds=ttl, max_events=BIG, max_bytes=BIG, clock=clock)
    fed = [pub(ch, seq, at=T0 + at) for seq, (ch, at) in enumerate(events, 1)]
    for p in fed:
        history.append(p)
    clock.now = T0 + now
    assert history.expire() == len(fed) - len(survivors)
    assert history.expire() == 0, "a second expiry at the same time finds nothing"
    kept = {
        ch: [p.seq for p in fed if p.event.channel == ch and p.seq in survivors]
        for ch in {ch for ch, _ in events}
    }
    assert [p.seq for p in history.since(sorted(kept), 0, FOREVER)] == survivors
    assert (history.events, history.bytes) == (len(survivors), len(survivors) * S)
    check_reads(history, fed, kept)


# ``steps``: ("feed", letters, seconds after T0) or ("expire", seconds after T0, expired).
TTL_THEN_BOUND = [
    pytest.param(
        8,
        [
            ("feed", "aaaaa", 0),
            ("feed", "bbb", 10),
            ("expire", 15, 5),  # a, the biggest channel, empties entirely
            ("feed", "ccc", 15),
            ("feed", "bb", 15),
            ("feed", "cc", 15),  # 9 then 9 events: b (5), then c (5) lose their oldest
        ],
        {"b": [7, 8, 12, 13], "c": [10, 11, 14, 15]},
        id="after the biggest channel expired away",
    ),
    pytest.param(
        10,
        [
            ("feed", "aaa", 0),
            ("feed", "aaa", 10),
            ("feed", "bbbb", 10),
            ("expire", 15, 3),  # a goes from 6 to 3: b is the biggest now
            ("feed", "aa", 15),
            ("feed", "bb", 15),  # 11 events: b (6) loses, not a (5)
        ],
        {"a": [4, 5, 6, 11, 12], "b": [8, 9, 10, 13, 14]},
        id="after the biggest channel shrank below another",
    ),
]


@pytest.mark.parametrize(("max_events", "steps", "kept"), TTL_THEN_BOUND)
def test_the_count_bound_still_takes_from_the_biggest_channel_after_a_ttl_expiry(
    max_events: int, steps: list[tuple[str, object, float]], kept: dict[str, list[int]]
) -> None:
    clock = Clock()
    history = History(ttl_seconds=10, max_events=max_events, max_bytes=BIG, clock=clock)
    fed: list[Published] = []
    for op, arg, value in steps:
        if op == "feed":
            assert isinstance(arg, str)
            clock.now = T0 + value
            for channel in arg:
                fed.append(pub(channel, len(fed) + 1, "x", clock.now))
                history.append(fed[-1])
        else:
            assert isinstance(arg, int | float)
            clock.now = T0 + arg
            assert history.expire() == value
    # entry sizes differ once seqs reach two digits: compare against the fed entries
    by_seq = {p.seq: p for p in fed}
    for channel, seqs in kept.items():
        assert [p.seq for p in history.since([channel], 0, FOREVER)] == seqs, channel
    held = [by_seq[seq] for seqs in kept.values() for seq in seqs]
    assert (history.events, history.bytes) == (len(held), sum(map(entry_size, held)))
    check_reads(history, fed, {"a": [], **kept})


# -- outage holes together with evictions ------------------------------------------------


@pytest.mark.parametrize("hole", [0, 1, 4, 6, 10, 11])
def test_a_hole_resets_every_position_before_it_and_evictions_the_rest(hole: int) -> None:
    # the "biggest at the moment" scene: a lost 1 and 2, b lost 5 and 6
    history = History(ttl_seconds=300, max_events=6, max_bytes=BIG, clock=Clock())
    fed = [pub(ch, seq) for seq, ch in enumerate("aaaabbbbba", 1)]
    for p in fed:
        history.append(p)
    history.mark_hole(hole)
    history.mark_hole(hole // 2)  # an older hole never moves the mark back
    assert history.last_hole == hole
    check_reads(history, fed, {"a": [3, 4, 10], "b": [7, 8, 9]}, hole=hole)
