"""Replay history and retained state (broker/history.py): pure unit tests, no I/O.

Every ``Published`` here is built the way the hub builds it; a fake clock drives
the TTL. The properties under test are the ones a resume relies on: the bounds
hold at all times, a noisy channel evicts only itself, ``lost_after`` never
calls a resume exact when a subscribed channel lost events after the position
(and never invents a loss), and ``since`` hands back exactly the missed events.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from itertools import count

import pytest

from broker import history as history_module
from broker.envelope import Event, Published
from broker.history import History, RetainedState, entry_size
from broker.metrics import Stats

EPOCH = "1700000000000"
BIG = 10**12  # a bound that never binds
FOREVER = 10**18  # an ``upto`` past every sequence


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def published(
    channel: str,
    seq: int,
    data: str = "x",
    *,
    at: float = 1000.0,
    event: str = "message",
    tenant: str | None = None,
    retain: str | None = None,
    deletes: bool = False,
) -> Published:
    return Published(
        Event(channel, data, event=event, tenant=tenant, retain=retain, deletes=deletes),
        seq,
        f"{EPOCH}-{seq}",
        at,
    )


class Feed:
    """Publishes into a History with one sequence across channels, like the hub."""

    def __init__(self, history: History, clock: FakeClock | None = None) -> None:
        self.history = history
        self.clock = clock
        self._seq = count(1)
        self.all: list[Published] = []

    def __call__(self, channel: str, data: str = "x") -> Published:
        at = self.clock() if self.clock is not None else 1000.0
        pub = published(channel, next(self._seq), data, at=at)
        self.history.append(pub)
        self.all.append(pub)
        return pub

    def many(self, channels: Iterable[str]) -> list[Published]:
        return [self(channel) for channel in channels]


def make_history(
    *,
    max_events: int = BIG,
    max_bytes: int = BIG,
    ttl: float = 300.0,
    clock: FakeClock | None = None,
) -> History:
    return History(
        ttl_seconds=ttl, max_events=max_events, max_bytes=max_bytes, clock=clock or FakeClock()
    )


def held(history: History, channels: Sequence[str]) -> list[Published]:
    """Everything the history holds for ``channels``, oldest first."""
    return history.since(channels, 0, FOREVER)


def seqs(pubs: Iterable[Published]) -> list[int]:
    return [p.seq for p in pubs]


SIZE = entry_size(published("c", 1))  # every entry of a one-digit seq on channel "c"


# -- the bounds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bound", "max_events", "max_bytes", "payloads", "kept"),
    [
        ("events", 3, BIG, ["x"] * 5, [3, 4, 5]),
        ("bytes", BIG, 3 * SIZE, ["x"] * 5, [3, 4, 5]),
        ("bytes, just under", BIG, 3 * SIZE - 1, ["x"] * 5, [4, 5]),
        ("bytes, one big event evicts many", BIG, 4 * SIZE, ["x"] * 4 + ["y" * 600], [5]),
        ("an event larger than the bound is not kept", BIG, SIZE, ["x", "y" * SIZE], []),
        ("both bounds, events binds", 2, 3 * SIZE, ["x"] * 4, [3, 4]),
        ("both bounds, bytes binds", 3, 2 * SIZE, ["x"] * 4, [3, 4]),
        ("history disabled", 0, BIG, ["x"] * 3, []),
    ],
)
def test_count_and_byte_bounds_evict_oldest_first(
    bound: str, max_events: int, max_bytes: int, payloads: list[str], kept: list[int]
) -> None:
    history = make_history(max_events=max_events, max_bytes=max_bytes)
    for seq, data in enumerate(payloads, 1):
        history.append(published("c", seq, data))
    assert seqs(held(history, ["c"])) == kept, bound
    assert history.events == len(kept)
    assert history.bytes == sum(entry_size(p) for p in held(history, ["c"]))
    assert history.evicted == len(payloads) - len(kept)
    assert history.events <= max_events and history.bytes <= max_bytes
    # whatever was evicted makes older positions inexact, the newest stays exact
    if history.evicted:
        assert history.lost_after(["c"], 0) == "expired"
    assert history.lost_after(["c"], len(payloads)) is None


def test_entry_size_counts_frame_chunk_and_overhead() -> None:
    pub = published("c", 1, "payload")
    assert entry_size(pub) == len(pub.frame) + len(pub.chunk) + history_module.ENTRY_OVERHEAD
    assert pub.frame == f"id: {EPOCH}-1\ndata: payload\n\n".encode()


def test_ttl_expires_old_events_on_every_channel() -> None:
    clock = FakeClock(1000.0)
    history = make_history(ttl=10, clock=clock)
    feed = Feed(history, clock)
    feed("a")  # 1 @1000
    feed("b")  # 2 @1000
    clock.now = 1005.0
    feed("a")  # 3 @1005
    feed("b")  # 4 @1005
    clock.now = 1010.0
    assert history.expire() == 0, "nothing is older than the TTL yet"
    clock.now = 1010.5
    assert history.expire() == 2
    assert seqs(held(history, ["a", "b"])) == [3, 4]
    assert (history.events, history.bytes) == (2, 2 * SIZE)
    assert history.lost_after(["a"], 0) == "expired"
    assert history.lost_after(["a"], 1) is None
    assert history.lost_after(["b"], 2) is None
    clock.now = 1100.0
    assert history.expire() == 2
    assert (history.events, history.bytes) == (0, 0)
    # emptied channels still remember what they lost
    assert history.lost_after(["a"], 2) == "expired"
    assert history.lost_after(["b"], 3) == "expired"
    assert history.lost_after(["a", "b"], 4) is None
    assert history.expire() == 0


@pytest.mark.slow
def test_memory_never_exceeds_the_bounds_under_a_long_flood() -> None:
    rng = random.Random(20240601)
    clock = FakeClock()
    max_events, max_bytes = 2_000, 600_000
    history = make_history(max_events=max_events, max_bytes=max_bytes, ttl=30, clock=clock)
    feed = Feed(history, clock)
    channels = [f"ch{i}" for i in range(50)]
    weights = [50, 20, 10, *([1] * 47)]  # a few noisy channels, many quiet ones
    payloads = ["x" * n for n in (1, 10, 100, 1_000, 4_000)]
    for batch in range(100):
        for channel in rng.choices(channels, weights, k=1_000):
            feed(channel, rng.choice(payloads))
        clock.now += 0.5
        if batch % 10 == 9:
            history.expire()
        assert history.events <= max_events, batch
        assert history.bytes <= max_bytes, batch
        kept = held(history, channels)
        assert len(kept) == history.events
        assert sum(entry_size(p) for p in kept) == history.bytes
        assert seqs(kept) == sorted(set(seqs(kept)))
    assert len(feed.all) == 100_000
    assert history.evicted == 100_000 - history.events


# -- fairness --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_events", "max_bytes", "quiet_payload"),
    [
        (100, BIG, "q"),  # the count bound binds
        (BIG, 20 * SIZE, "q" * 1_000),  # the byte bound binds; quiet events are big
    ],
)
def test_noisy_channel_cannot_evict_a_quiet_channels_few_events(
    max_events: int, max_bytes: int, quiet_payload: str
) -> None:
    history = make_history(max_events=max_events, max_bytes=max_bytes)
    feed = Feed(history)
    before = feed("noisy")
    quiet = [feed("quiet", quiet_payload), feed("noisy"), feed("quiet", quiet_payload)]
    for _ in range(10_000):
        feed("noisy")
        assert history.events <= max_events and history.bytes <= max_bytes
    assert held(history, ["quiet"]) == [quiet[0], quiet[2]]
    for position in (0, before.seq, quiet[0].seq):
        assert history.lost_after(["quiet"], position) is None
    assert history.since(["quiet"], before.seq, FOREVER) == [quiet[0], quiet[2]]
    # the noisy channel paid for it, and its own old positions say so
    assert history.lost_after(["noisy"], before.seq) == "expired"
    assert history.lost_after(["quiet", "noisy"], before.seq) == "expired"
    assert len(held(history, ["noisy"])) > 2


def test_the_channel_holding_the_most_events_loses_whichever_it_is() -> None:
    history = make_history(max_events=10)
    feed = Feed(history)
    old = feed.many(["big"] * 8)
    small = feed.many(["small"] * 2)
    # "small" now sends more, but "big" still holds more: "big" loses
    more = feed.many(["small"] * 3)
    assert seqs(held(history, ["big"])) == seqs(old[3:])
    assert held(history, ["small"]) == small + more
    assert history.lost_after(["small"], 0) is None
    # once "small" holds the most, it loses its own oldest
    feed("small")
    assert len(held(history, ["small"])) == 5 and len(held(history, ["big"])) == 5
    assert history.lost_after(["small"], 0) == "expired"
    assert history.lost_after(["small"], small[0].seq) is None


# -- lost_after and mark_hole ----------------------------------------------------------


def _evicted_scene() -> tuple[History, dict[str, list[Published]]]:
    """a: 6 events of which the 3 oldest are evicted; q: 2 quiet events; b: never evicted."""
    history = make_history(max_events=7)
    feed = Feed(history)
    pubs: dict[str, list[Published]] = {"a": [], "b": [], "q": []}
    for channel in ["a", "q", "a", "a", "b", "a", "q", "a", "a", "b"]:
        pubs[channel].append(feed(channel))
    # 10 events, max 7: "a" (the biggest, 6) lost its 3 oldest (seq 1, 3, 4)
    assert seqs(held(history, ["a"])) == [6, 8, 9]
    return history, pubs


@pytest.mark.parametrize(
    ("channels", "position", "expected"),
    [
        (["a"], 0, "expired"),
        (["a"], 3, "expired"),  # seq 4 of "a" was evicted after it
        (["a"], 4, None),  # everything "a" lost is at or before 4
        (["a"], 5, None),
        (["a"], 10, None),
        (["q"], 0, None),  # quiet: an old position alone is no reason to reset
        (["b"], 0, None),
        (["q", "b"], 0, None),
        (["q", "a"], 2, "expired"),
        (["q", "a"], 4, None),
        (["never-seen"], 0, None),
        ([], 0, None),
    ],
)
def test_lost_after_is_expired_only_when_a_subscribed_channel_lost_later_events(
    channels: list[str], position: int, expected: str | None
) -> None:
    history, _ = _evicted_scene()
    assert history.lost_after(channels, position) == expected


def test_mark_hole_resets_positions_before_the_hole_only() -> None:
    history, _ = _evicted_scene()
    history.mark_hole(12)
    for position in (0, 5, 11):
        assert history.lost_after(["q"], position) == "outage"
        assert history.lost_after([], position) == "outage"
    # before an eviction and before the hole: the outage is the reason
    assert history.lost_after(["a"], 0) == "outage"
    for position in (12, 13, 100):
        assert history.lost_after(["q", "a", "b"], position) is None
    history.mark_hole(7)  # an older hole never moves the mark back
    assert history.lost_after(["q"], 11) == "outage"
    history.mark_hole(20)
    assert history.lost_after(["q"], 12) == "outage"
    assert history.lost_after(["q"], 20) is None


# -- since -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "position", "upto", "expected"),
    [
        (["a", "b", "c"], 0, FOREVER, [1, 2, 3, 4, 5, 6, 7, 8, 9]),
        (["c", "b", "a"], 0, FOREVER, [1, 2, 3, 4, 5, 6, 7, 8, 9]),  # order of channels is moot
        (["a"], 0, FOREVER, [1, 4, 7]),
        (["a", "c"], 0, FOREVER, [1, 3, 4, 6, 7, 9]),
        (["a", "b"], 4, FOREVER, [5, 7, 8]),
        (["a", "b"], 4, 7, [5, 7]),  # upto is inclusive; later events come live
        (["a", "b", "c"], 9, FOREVER, []),
        (["a", "b", "c"], 3, 3, []),
        (["a", "b", "c"], 5, 2, []),
        (["a", "unknown"], 2, FOREVER, [4, 7]),
        (["unknown"], 0, FOREVER, []),
    ],
)
def test_since_merges_channels_in_seq_order_up_to_upto(
    channels: list[str], position: int, upto: int, expected: list[int]
) -> None:
    history = make_history()
    feed = Feed(history)
    feed.many(["a", "b", "c"] * 3)
    got = history.since(channels, position, upto)
    assert seqs(got) == expected
    assert len({id(p) for p in got}) == len(got), "no event twice"
    assert all(p.event.channel in channels for p in got)


def test_since_after_evictions_returns_only_what_is_held() -> None:
    history, pubs = _evicted_scene()
    got = history.since(["a", "q", "b"], 4, FOREVER)
    assert seqs(got) == [5, 6, 7, 8, 9, 10]
    assert got == sorted(pubs["a"][3:] + pubs["q"][1:] + pubs["b"], key=lambda p: p.seq)


# -- remembering emptied channels ------------------------------------------------------


def test_emptied_channel_keeps_its_eviction_mark_when_it_comes_back() -> None:
    history = make_history(max_events=1)
    feed = Feed(history)
    feed("a")  # 1
    feed("b")  # 2: evicts a's 1; a is empty now
    assert history.lost_after(["a"], 0) == "expired"
    assert history.lost_after(["a"], 1) is None
    feed("a")  # 3: evicts b's 2; a has a log again
    assert history.lost_after(["a"], 0) == "expired"
    assert history.lost_after(["a"], 1) is None
    assert history.lost_after(["b"], 1) == "expired"
    assert seqs(history.since(["a"], 1, FOREVER)) == [3]


def test_forgetting_empty_channels_past_the_limit_stays_safe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(history_module, "MAX_EMPTY_CHANNELS", 2)
    history = make_history(max_events=1)
    feed = Feed(history)
    channels = [f"c{i}" for i in range(8)]
    lost: dict[str, int] = {}
    for channel in channels:
        pub = feed(channel)
        lost[channel] = pub.seq
    # each append evicted the previous channel's only event: c0..c6 are empty
    assert seqs(held(history, channels)) == [8]
    assert len(history._empty) <= 2, "the memory of empty channels is bounded"
    newest_loss = max(seq for ch, seq in lost.items() if ch != "c7")
    for channel in channels[:-1]:
        # safety: a position before a channel's eviction is never called exact,
        # whether the channel is still remembered or was folded into the global mark
        assert history.lost_after([channel], lost[channel] - 1) == "expired", channel
        # and after every eviction there is nothing to reset for
        assert history.lost_after([channel], newest_loss) is None, channel
    # the two most recently emptied channels are still answered exactly
    for channel in channels[-3:-1]:
        assert history.lost_after([channel], lost[channel]) is None, channel
    # a folded channel that receives events again does not forget its loss
    feed("c0")
    assert history.lost_after(["c0"], lost["c0"] - 1) == "expired"
    assert history.lost_after(["c0"], newest_loss) is None
    assert seqs(history.since(["c0"], newest_loss, FOREVER)) == [9]
    # a channel never seen is exact for any position after the forgotten ones
    assert history.lost_after(["never-seen"], newest_loss) is None


# -- retained state --------------------------------------------------------------------


def retained(
    channel: str, seq: int, key: str | None, data: str = "v", *, tenant: str | None = None
) -> Published:
    return published(channel, seq, data, retain=key, tenant=tenant)


def deletion(channel: str, seq: int, key: str, *, tenant: str | None = None) -> Published:
    return published(channel, seq, "null", retain=key, tenant=tenant, deletes=True)


def test_retained_key_is_set_replaced_and_deleted() -> None:
    state = RetainedState(max_keys=10, max_bytes=BIG, stats=Stats())
    v1 = retained("s", 1, "status", "v1")
    v2 = retained("s", 2, "status", "v2 is longer")
    assert state.apply(v1)
    assert state.apply(v2)
    assert state.snapshot(["s"], None) == [v2]
    assert (state.keys, state.bytes) == (1, entry_size(v2))
    assert state.apply(deletion("s", 3, "status"))
    assert state.snapshot(["s"], None) == []
    assert (state.keys, state.bytes) == (0, 0)
    assert state.apply(deletion("s", 4, "status")), "deleting a missing key is fine"
    assert state.apply(published("s", 5, "not retained"))
    assert (state.keys, state.bytes, state.stats.retained_refused) == (0, 0, 0)


def test_retained_state_is_scoped_per_tenant() -> None:
    state = RetainedState(max_keys=10, max_bytes=BIG, stats=Stats())
    everyone = retained("c", 1, "k", "for everyone")
    acme = retained("c", 2, "k", "acme's k", tenant="acme")
    acme_other = retained("c", 3, "other", "acme's other", tenant="acme")
    globex = retained("c", 4, "k", "globex's k", tenant="globex")
    for pub in (everyone, acme, acme_other, globex):
        assert state.apply(pub)
    assert state.keys == 4
    assert state.snapshot(["c"], None) == [everyone]
    assert state.snapshot(["c"], "acme") == [everyone, acme, acme_other]
    assert state.snapshot(["c"], "globex") == [everyone, globex]
    assert state.snapshot(["c"], "initech") == [everyone]
    # a tenant's deletion leaves the same key of other scopes alone
    assert state.apply(deletion("c", 5, "k", tenant="acme"))
    assert state.snapshot(["c"], "acme") == [everyone, acme_other]
    assert state.snapshot(["c"], "globex") == [everyone, globex]


def test_snapshot_is_in_publish_order_across_channels_and_scopes() -> None:
    state = RetainedState(max_keys=100, max_bytes=BIG, stats=Stats())
    order = [
        retained("b", 1, "x"),
        retained("a", 2, "x", tenant="t"),
        retained("a", 3, "y"),
        retained("c", 4, "x"),  # not subscribed
        retained("b", 5, "y", tenant="t"),
        retained("a", 6, "z"),
    ]
    for pub in order:
        state.apply(pub)
    state.apply(retained("b", 7, "x", "replaced"))  # moves b/x to the end
    snap = state.snapshot(["a", "b"], "t")
    assert seqs(snap) == [2, 3, 5, 6, 7]
    assert snap[-1].event.data == "replaced"


def test_max_keys_refuses_new_keys_but_updates_existing_ones() -> None:
    state = RetainedState(max_keys=2, max_bytes=BIG, stats=Stats())
    assert state.apply(retained("c", 1, "k1"))
    assert state.apply(retained("c", 2, "k2"))
    assert not state.apply(retained("c", 3, "k3"))
    assert state.stats.retained_refused == 1
    assert seqs(state.snapshot(["c"], None)) == [1, 2]
    assert state.apply(retained("c", 4, "k1", "updated"))
    assert state.keys == 2
    assert seqs(state.snapshot(["c"], None)) == [2, 4]
    assert not state.apply(retained("c", 5, "k3", tenant="t")), "max_keys spans every scope"
    assert state.apply(deletion("c", 6, "k2"))
    assert state.apply(retained("c", 7, "k3"))
    assert seqs(state.snapshot(["c"], None)) == [4, 7]
    assert state.stats.retained_refused == 2


def test_max_bytes_drops_a_key_whose_update_would_pass_it() -> None:
    small1, small2 = retained("c", 1, "k1", "a"), retained("c", 2, "k2", "b")
    state = RetainedState(
        max_keys=100, max_bytes=entry_size(small1) + entry_size(small2) + 50, stats=Stats()
    )
    assert state.apply(small1)
    assert state.apply(small2)
    big = retained("c", 3, "k1", "x" * 200)
    assert not state.apply(big)
    # neither the stale value nor the refused one is served as current
    assert state.snapshot(["c"], None) == [small2]
    assert (state.keys, state.bytes, state.stats.retained_refused) == (1, entry_size(small2), 1)
    assert not state.apply(retained("c", 4, "k9", "y" * 500)), "a new key too big is refused"
    assert state.snapshot(["c"], None) == [small2]
    assert state.apply(retained("c", 5, "k1", "c"))
    assert seqs(state.snapshot(["c"], None)) == [2, 5]
    assert state.bytes <= state.max_bytes
