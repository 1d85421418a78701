"""The bridge's handover rule, in process: what a new lease holder appends from its
buffer, and when it must write a hole marker first.

The end-to-end proofs (a fleet, the leader SIGKILLed under load) are in
test_bridge.py; here every case of the rule is one row.
"""

from __future__ import annotations

import time

import pytest

from broker.config import Config
from broker.ingest import Context
from broker.ingest.bridge import Buffered, Relay, digest, place
from broker.metrics import Stats
from broker.positions import Entry
from broker.redis_conn import redis_target

WINDOW = 10.0
NOW_MS = 1_700_000_100_000


@pytest.mark.parametrize(
    ("tail", "buffer", "found"),
    [
        ("cba", "abcde", [2]),  # the stream ends at c: d, e follow
        ("e", "abcde", [4]),  # all appended
        ("x", "abcde", []),  # not heard here
        ("cbx", "abcde", []),  # c matches, but the entry before it does not
        ("ba", "bcde", [0]),  # the buffer starts at b: compared as far as it reaches
        ("b", "abab", [3, 1]),  # repeated payloads: two places, newest first
        ("ba", "abab", [3, 1]),  # still two: the first only as far as the buffer reaches
        ("ba", "xabab", [4, 2]),
        ("bc", "cbab", [1]),  # a longer tail tells the places apart
        ("a", "", []),
    ],
)
def test_place_finds_where_the_stream_ends_in_the_buffer(
    tail: str, buffer: str, found: list[int]
) -> None:
    assert place(list(tail), list(buffer)) == found


def relay(heard: str, *, listened: float, overflowed: bool = False) -> Relay:
    cfg = Config()
    never = lambda: pytest.fail("the handover rule reads no Redis")  # noqa: E731
    context = Context(cfg, redis_target(cfg.redis), never, "1", Stats())
    r = Relay(context, lambda channel, payload, limit: {"channel": channel, "data": "x"})
    now = time.monotonic()
    for name in heard:
        d = digest("c", name.encode())
        r.buffer.append(Buffered(d, {"channel": "c", "data": name, "digest": d}, now, 1))
    r.since = now - listened
    r.overflowed = overflowed
    r.window = WINDOW
    return r


def tail_of(appended: str, *, last_ms: int = NOW_MS) -> list[Entry]:
    """The stream's last entries, newest first, as XREVRANGE returns them."""
    return [
        (f"{last_ms}-{i}".encode(), {b"digest": digest("c", name.encode()).encode()})
        for i, name in enumerate(reversed(appended))
    ]


@pytest.mark.parametrize(
    ("appended", "heard", "listened", "newest_age_s", "overflowed", "append", "hole"),
    [
        # the old holder appended a..c; this one heard a..e: d, e follow, nothing lost
        ("abc", "abcde", 1.0, 0.1, False, "de", False),
        ("abcde", "abcde", 1.0, 0.1, False, "", False),
        # it joined late (heard from c on): the place is unique but not proven (the
        # buffer does not reach back over the whole tail): a hole marker first
        ("abc", "cde", 1.0, 0.1, False, "de", True),
        # repeated payloads: no one place; after the newest, and a hole says so
        ("xa", "xaxa", 30.0, 0.1, False, "", True),
        # the stream's newest entry is not in the buffer although recent: lost to us
        ("abz", "cde", 30.0, 1.0, False, "cde", True),
        # a quiet stream: its newest entry is older than the window and the buffer
        # holds everything heard since (listening longer than the window)
        ("ab", "cde", 30.0, 60.0, False, "cde", False),
        # ...but not when it has not listened that long
        ("ab", "cde", 3.0, 60.0, False, "cde", True),
        # ...nor when messages left the buffer early (a flood past its bounds)
        ("ab", "cde", 30.0, 60.0, True, "cde", True),
        # an empty stream, listened long enough, nothing in the window
        ("", "", 30.0, 1e6, False, "", False),
    ],
)
def test_the_handover_appends_what_follows_or_writes_a_hole(
    appended: str,
    heard: str,
    listened: float,
    newest_age_s: float,
    overflowed: bool,
    append: str,
    hole: bool,
) -> None:
    r = relay(heard, listened=listened, overflowed=overflowed)
    newest_ms = NOW_MS - int(newest_age_s * 1000)
    entries, got_hole = r._handover(tail_of(appended, last_ms=newest_ms), newest_ms, NOW_MS)
    assert ("".join(f["data"] for f in entries), got_hole) == (append, hole)


def test_digests_name_channel_and_bytes() -> None:
    assert digest("a", b"x") == digest("a", b"x")
    assert len({digest("a", b"x"), digest("b", b"x"), digest("a", b"y"), digest("a", b"x ")}) == 4
    assert digest("a\0b", b"") != digest("a", b"b"), "the separator keeps fields apart"


def test_the_first_lease_on_no_stream_appends_its_buffer_without_a_hole() -> None:
    r = relay("ab", listened=0.5)  # just started: a later holder would owe a hole
    entries, hole = r._handover([], 0, NOW_MS, first=True)
    assert ("".join(f["data"] for f in entries), hole) == ("ab", False)
    assert r._handover([], 0, NOW_MS)[1] is True
