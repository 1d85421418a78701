"""Hostile inbound messages: a flood of malformed ones never disturbs a client's stream (issue 11).

For each ingest -- native envelopes over pub/sub, Laravel broadcasts over
pub/sub, stream entries -- one client reads channel ``good`` while the test
publishes good events at a steady ``GOOD_RATE`` per second, each carrying its
publish time. Meanwhile another process floods Redis in alternate windows of
``WINDOW`` seconds (quiet, flood, quiet, flood, ...: ``ROUNDS`` pairs, on the
host's monotonic clock, so that whatever else the machine does hits both
alike) with ``FLOOD_RATE`` (12,000) malformed messages per second, sent
every millisecond: bad JSON, wrong types for ``tenant``, ``users``,
``retain`` and ``event``, NUL and newline ids, reserved and multi-line event
names, oversize and non-UTF-8 payloads, bad channel names, Laravel-shaped
garbage, stream entries with missing or invalid fields -- on other channels
and on ``good`` itself (there, only messages that must be rejected, so every
event the client gets is a good one).

Then: the client got every good event, in order, and nothing else;
``sse_broker_events_rejected_total`` went up by exactly the rejections the
flood carried, per reason; the flood ran at 10,000 messages/s or more;
``/readyz`` answered 200 throughout; the broker logged no traceback and no
ERROR; and the p99 publish-to-receive latency of the events published in
flood windows is at most twice the p99 of those published in quiet windows
of the same run (the baseline). A p99 of ~1-2 ms on a shared two-core
machine moves with whatever else runs there, so a measurement that breaks
the bound is repeated and the majority of up to three decides; every
figure is printed (``-s``).

The flood runs in its own process (``python -c`` importing this module) so
that it does not share an event loop, or the GIL, with the client whose
latency is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
import redis
from helpers import eventually, parse_metrics
from sse_client import SSEClient, SSEStream

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from conftest import BrokerProcess, StartBroker

TESTS = Path(__file__).resolve().parent
MAX_EVENT_BYTES = 1024  # limits.max_event_bytes: oversize messages stay cheap to send
GOOD_RATE = 300  # good events per second, all along
WINDOW = 1.0  # seconds: quiet and flood windows alternate, so drift hits both alike
ROUNDS = 4  # quiet + flood pairs
SETTLE = 0.1  # seconds after each switch that count for neither
FLOOD_RATE = 12_000  # malformed messages per second (the issue asks for >= 10,000)
TICK = 0.001  # the flood sends what is due every millisecond: a steady rate, not bursts
STREAM_KEY = "sse:stream"
PREFIX = b"sse:"

# -- the malformed messages ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bad:
    """One inbound message and what the broker must make of it.

    ``reason``: the ``sse_broker_events_rejected_total`` label it must be
    counted under; None when the README says it is delivered (native text)
    or ignored without a count -- such messages go to other channels only.
    """

    channel: bytes  # the Redis channel (pub/sub) or the entry's channel field (stream)
    payload: bytes = b""  # pub/sub
    fields: tuple[tuple[bytes, bytes], ...] = ()  # stream
    reason: str | None = None


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


_OVERSIZE = b"x" * (MAX_EVENT_BYTES + 1)
_ID_DEFECTS = ["a\x00b", "a\nb", "", "x" * 300, "\u2028"]  # NUL/newline ids and the like


def native_messages() -> list[Bad]:
    """Native envelopes over pub/sub: (payload, reason) on ``good`` and on other channels."""
    rejected: list[tuple[bytes, str]] = [
        (_j({"data": 1, "event": "broker.reset"}), "reserved_event"),
        (_j({"data": 1, "event": "a\nb"}), "bad_event"),
        (_j({"data": 1, "event": "a\r"}), "bad_event"),
        (_j({"data": 1, "event": "a\x00"}), "bad_event"),
        (_j({"data": 1, "event": ""}), "bad_event"),
        (_j({"data": 1, "event": 5}), "bad_event"),
        (_j({"data": 1, "event": "e" * 201}), "bad_event"),
        (_j({"data": 1, "tenant": [1]}), "bad_tenant"),
        (_j({"data": 1, "tenant": True}), "bad_tenant"),
        (_j({"data": 1, "tenant": 1.5}), "bad_tenant"),
        *((_j({"data": 1, "tenant": t}), "bad_tenant") for t in _ID_DEFECTS),
        (_j({"data": 1, "users": "u1"}), "bad_users"),
        (_j({"data": 1, "users": []}), "bad_users"),
        (_j({"data": 1, "users": [None]}), "bad_users"),
        (_j({"data": 1, "users": {"u": 1}}), "bad_users"),
        *((_j({"data": 1, "users": ["u1", u]}), "bad_users") for u in _ID_DEFECTS),
        (_j({"data": 1, "retain": 5}), "bad_retain"),
        (_j({"data": 1, "retain": ""}), "bad_retain"),
        (_j({"data": 1, "retain": "k\x00"}), "bad_retain"),
        (_j({"data": 1, "retain": ["k"]}), "bad_retain"),
        (_j({"data": 1, "retain": "k", "users": ["u1"]}), "retain_with_users"),
        (b'{"data": "' + _OVERSIZE + b'"}', "too_large"),
        (_OVERSIZE, "too_large"),
        (b"\xff\xfe\x00", "bad_encoding"),
        (b"caf\xe9", "bad_encoding"),
        (b'{"data": "\xff"}', "bad_encoding"),  # not JSON (bad UTF-8), so text: not UTF-8
    ]
    delivered = [  # no envelope: delivered whole as text (README), so never on "good"
        b'{"data": 1',
        b'{"event": "x"}',
        b"[1, 2]",
        b"null",
        b"",
        b"{}",
        b"plain text",
        b'{"data": 1}\x00',
    ]
    out = [Bad(PREFIX + b"good", p, reason=r) for p, r in rejected]
    for i, (payload, reason) in enumerate(rejected):
        out.append(Bad(PREFIX + b"noise.%d" % (i % 7), payload, reason=reason))
    out += [Bad(PREFIX + b"noise.text", p) for p in delivered]
    out += _bad_channels(_j({"data": 1}))
    return out


def _bad_channels(payload: bytes) -> list[Bad]:
    """Messages on channel names no client can subscribe to."""
    return [
        Bad(PREFIX + b"bad channel", payload, reason="bad_channel"),
        Bad(PREFIX + b"x" * 201, payload, reason="bad_channel"),
        Bad(PREFIX + b"caf\xc3\xa9", payload, reason="bad_channel"),
        Bad(PREFIX + b"\xff", payload, reason="bad_channel"),
        Bad(PREFIX, payload, reason="bad_channel"),  # the empty name
        Bad(PREFIX + b"good\n", payload, reason="bad_channel"),
        Bad(PREFIX + b"!canary!x", payload),  # looks like a canary: ignored, not counted
    ]


def laravel_messages() -> list[Bad]:
    """Laravel broadcasts (``{"event", "data", "socket"}``): every malformed one is rejected."""
    ev = {"event": "App\\Events\\X", "data": {"id": 1}}
    rejected: list[tuple[bytes, str]] = [
        (b"not json", "bad_envelope"),
        (b'{"event": "x"', "bad_envelope"),
        (b"[1, 2]", "bad_envelope"),
        (b"null", "bad_envelope"),
        (b'{"data": {"id": 1}}', "bad_envelope"),
        (b"\xff\xfe", "bad_envelope"),
        (_j({**ev, "socket": 5}), "bad_envelope"),
        (_j({**ev, "socket": ["a"]}), "bad_envelope"),
        (_j({**ev, "data": {"socket": 5}}), "bad_envelope"),
        (_j({**ev, "event": 5}), "bad_event"),
        (_j({**ev, "event": None}), "bad_event"),
        (_j({**ev, "event": ""}), "bad_event"),
        (_j({**ev, "event": "a\nb"}), "bad_event"),
        (_j({**ev, "event": "broker.reconnect"}), "reserved_event"),
        *((_j({**ev, "tenant": t}), "bad_tenant") for t in [*_ID_DEFECTS, [1], 1.5]),
        *((_j({**ev, "users": ["u", u]}), "bad_users") for u in _ID_DEFECTS),
        (_j({**ev, "users": []}), "bad_users"),
        (_j({**ev, "users": "u"}), "bad_users"),
        (_j({**ev, "retain": 5}), "bad_retain"),
        (_j({**ev, "retain": "k", "users": ["u"]}), "retain_with_users"),
        (_j({**ev, "data": "x" * MAX_EVENT_BYTES}), "too_large"),
    ]
    out = [Bad(PREFIX + b"good", p, reason=r) for p, r in rejected]
    out += [Bad(PREFIX + b"noise.%d" % (i % 7), p, reason=r) for i, (p, r) in enumerate(rejected)]
    out += _bad_channels(_j(ev))
    return out


def stream_messages() -> list[Bad]:
    """Stream entries with missing or invalid fields."""
    data = (b"data", b"1")

    def entry(channel: bytes, *fields: tuple[bytes, bytes]) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"channel", channel), *fields)

    rejected: list[tuple[tuple[tuple[bytes, bytes], ...], str]] = []
    for channel in (b"good", b"noise.1"):
        rejected += [
            (entry(channel), "bad_data"),
            (entry(channel, (b"event", b"x")), "bad_data"),
            (entry(channel, data, (b"event", b"broker.x")), "reserved_event"),
            (entry(channel, data, (b"event", b"")), "bad_event"),
            (entry(channel, data, (b"event", b"a\nb")), "bad_event"),
            *((entry(channel, data, (b"tenant", t.encode())), "bad_tenant") for t in _ID_DEFECTS),
            (entry(channel, data, (b"users", b"not json")), "bad_users"),
            (entry(channel, data, (b"users", b'"u1"')), "bad_users"),
            (entry(channel, data, (b"users", b"[]")), "bad_users"),
            (entry(channel, data, (b"users", b'["a\\u0000b"]')), "bad_users"),
            (entry(channel, data, (b"retain", b"")), "bad_retain"),
            (entry(channel, data, (b"retain", b"k"), (b"users", b'["u"]')), "retain_with_users"),
            (entry(channel, (b"data", _OVERSIZE)), "too_large"),
            (entry(channel, (b"data", b"\xff")), "bad_encoding"),
            (entry(channel, data, (b"\xfe", b"x")), "bad_encoding"),
        ]
    rejected += [
        (((b"data", b"1"),), "bad_channel"),  # no channel at all
        (entry(b"bad channel", data), "bad_channel"),
        (entry(b"", data), "bad_channel"),
        (entry(b"x" * 201, data), "bad_channel"),
    ]
    return [Bad(dict(f).get(b"channel", b"?"), fields=f, reason=r) for f, r in rejected]


def messages(mode: str) -> list[Bad]:
    return {"native": native_messages, "laravel": laravel_messages, "stream": stream_messages}[
        mode
    ]()


# -- the flood (its own process) -------------------------------------------------------------------


def window_of(t: float, t0: float) -> int:
    """The window a moment falls in: even = quiet (the baseline), odd = flood; -1 before
    ``t0``. Moments within ``SETTLE`` after a switch belong to neither (-1): the broker
    may still be working off what came before the switch."""
    if t < t0:
        return -1
    n, into = divmod(t - t0, WINDOW)
    return -1 if into < SETTLE else int(n)


def flood_main(args: dict[str, Any]) -> None:
    """Publish ``messages(mode)`` round-robin at ``rate``/s in every odd window of
    ``WINDOW`` seconds from ``t0`` (CLOCK_MONOTONIC, the same in every process of the
    host), ``2 * rounds`` windows in all, pipelined every ``TICK``. Prints ``t0`` first,
    then a JSON report: sent, seconds of flooding, count per expected reason."""
    client = redis.Redis.from_url(args["redis_url"])
    batch_of = messages(args["mode"])
    rate, rounds = args["rate"], args["rounds"]
    expected: Counter[str] = Counter()
    sent = i = 0
    flooding = 0.0
    t0 = time.monotonic() + 0.3
    print(json.dumps({"t0": t0}), flush=True)
    for r in range(rounds):
        start = t0 + (2 * r + 1) * WINDOW
        end = start + WINDOW
        time.sleep(max(0.0, start - time.monotonic()))
        window_sent = 0
        while (now := time.monotonic()) < end:
            due = int(rate * (now - start + TICK)) - window_sent
            pipe = client.pipeline(transaction=False)
            for _ in range(max(0, due)):
                bad = batch_of[i % len(batch_of)]
                i += 1
                if bad.fields:
                    pipe.xadd(args["stream_key"], dict(bad.fields))
                else:
                    pipe.publish(bad.channel, bad.payload)
                expected[bad.reason or "none"] += 1
            if due > 0:
                pipe.execute()
                window_sent += due
            time.sleep(TICK)
        flooding += time.monotonic() - start
        sent += window_sent
    print(json.dumps({"sent": sent, "seconds": flooding, "expected": dict(expected)}))


def start_flood(mode: str, redis_url: str) -> subprocess.Popen[bytes]:
    args = {
        "mode": mode,
        "redis_url": redis_url,
        "rate": FLOOD_RATE,
        "rounds": ROUNDS,
        "stream_key": STREAM_KEY,
    }
    code = f"import test_hostile_inbound as m; m.flood_main({args!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )


# -- good events and their latency -----------------------------------------------------------------


class Good:
    """Publishes good events on ``good`` at a steady rate; the client checks them off."""

    def __init__(self, mode: str, client: aioredis.Redis) -> None:
        self.mode = mode
        self.redis = client
        self.seq = 0
        self.sent_ns: dict[int, int] = {}

    async def publish(self, count: int, rate: float, started: float | None = None) -> None:
        started = time.monotonic() if started is None else started
        for n in range(count):
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.seq += 1
            now = time.monotonic_ns()
            self.sent_ns[self.seq] = now
            if self.mode == "stream":
                fields = {"channel": "good", "event": "good", "data": f"{self.seq}:{now}"}
                await self.redis.xadd(STREAM_KEY, fields)  # type: ignore[arg-type]
            elif self.mode == "laravel":
                payload = orjson.dumps({"event": "good", "data": {"seq": self.seq, "ns": now}})
                await self.redis.publish("sse:good", payload)
            else:
                payload = orjson.dumps({"event": "good", "data": f"{self.seq}:{now}"})
                await self.redis.publish("sse:good", payload)


def good_seq(data: str) -> tuple[int, int]:
    """(seq, publish ns) of a good event's data."""
    if data.startswith("{"):
        doc = orjson.loads(data)
        return int(doc["seq"]), int(doc["ns"])
    seq, _, ns = data.partition(":")
    return int(seq), int(ns)


class Reader:
    """Reads the client's stream: every event, when it arrived."""

    def __init__(self, stream: SSEStream) -> None:
        self.stream = stream
        self.received: list[tuple[int, int, str, str]] = []  # (arrival ns, seq, type, data)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            event = await self.stream.next_event(timeout=3600)
            now = time.monotonic_ns()
            seq = -1
            with contextlib.suppress(ValueError, KeyError, orjson.JSONDecodeError):
                seq = good_seq(event.data)[0]
            self.received.append((now, seq, event.type, event.data))

    async def until(self, seq: int, timeout: float) -> None:
        await eventually(
            lambda: _async(self.received),
            lambda got: any(s == seq for _, s, _, _ in got),
            timeout=timeout,
            interval=0.01,
        )


async def _async(value: Any) -> Any:
    return value


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


def latencies_ms(reader: Reader, good: Good, attempt: Attempt) -> tuple[list[float], list[float]]:
    """Publish-to-receive latencies of an attempt's good events published in quiet
    windows, and of those published in flood windows."""
    quiet: list[float] = []
    loud: list[float] = []
    for arrived, seq, _, _ in reader.received:
        if not attempt.first <= seq <= attempt.last:
            continue
        sent = good.sent_ns[seq]
        window = window_of(sent / 1e9, attempt.t0)
        if window >= 0:
            (loud if window % 2 else quiet).append((arrived - sent) / 1e6)
    return quiet, loud


# -- the test --------------------------------------------------------------------------------------


def broker_settings(mode: str) -> list[str]:
    sets = [f"limits.max_event_bytes={MAX_EVENT_BYTES}", "sse.heartbeat_seconds=300"]
    if mode == "laravel":
        sets.append("ingest.format=laravel")
    if mode == "stream":
        sets += ["ingest.mode=stream", f"ingest.stream_key={STREAM_KEY}"]
    return sets


def rejected(metrics_text: str) -> Counter[str]:
    return Counter(
        {
            s.labels["reason"]: int(s.value)
            for s in parse_metrics(metrics_text)
            if s.name == "sse_broker_events_rejected_total"
        }
    )


async def readiness(broker: BrokerProcess, until: float, answers: list[tuple[int, float]]) -> None:
    """Poll the admin ``/readyz`` every 250 ms until ``until`` (monotonic)."""
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            status, _ = await broker.get("/readyz", timeout=5)
        except (OSError, TimeoutError, aiohttp.ClientError):
            status = 0
        answers.append((status, time.monotonic() - started))
        await asyncio.sleep(0.25)


@dataclass
class Attempt:
    """One measurement: a flood process through ``ROUNDS`` quiet + flood windows."""

    first: int  # the good events it published
    last: int
    t0: float  # its windows' start (CLOCK_MONOTONIC)
    report: dict[str, Any]  # what the flood process sent
    answers: list[tuple[int, float]]  # /readyz: (status, seconds), every 250 ms

    @property
    def rate(self) -> float:
        return float(self.report["sent"] / self.report["seconds"])

    def expected(self) -> Counter[str]:
        return Counter({k: v for k, v in self.report["expected"].items() if k != "none"})


async def measure(
    broker: BrokerProcess, mode: str, redis_url: str, good: Good, reader: Reader
) -> Attempt:
    """Run the flood through its windows while good events go out at a steady rate;
    wait until the client has them all and every rejection is counted."""
    before = rejected(await broker.metrics())
    count = int(GOOD_RATE * WINDOW * 2 * ROUNDS)
    first = good.seq + 1
    flood = start_flood(mode, redis_url)
    answers: list[tuple[int, float]] = []
    try:
        line = await asyncio.to_thread(flood.stdout.readline)  # type: ignore[union-attr]
        assert line.startswith(b'{"t0"'), (line, flood.stderr.read())  # type: ignore[union-attr]
        t0 = json.loads(line)["t0"]
        ready = asyncio.create_task(readiness(broker, t0 + 2 * ROUNDS * WINDOW, answers))
        await good.publish(count, GOOD_RATE, started=t0)
        await ready
        out, err = await asyncio.to_thread(flood.communicate, timeout=30)
        assert flood.returncode == 0, err.decode()[-2000:]
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    attempt = Attempt(first, good.seq, t0, json.loads(out.splitlines()[-1]), answers)
    await reader.until(good.seq, timeout=15)

    # The flood was one, and every malformed message in it was counted, by reason.
    assert attempt.rate >= 10_000, attempt.report

    async def delta() -> Counter[str]:
        return rejected(await broker.metrics()) - before

    counted = await eventually(delta, lambda d: d == attempt.expected(), timeout=15)
    assert counted == attempt.expected()
    # Readiness held throughout.
    assert answers and all(status == 200 for status, _ in answers), answers
    return attempt


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["native", "laravel", "stream"])
async def test_a_flood_of_malformed_messages_does_not_disturb_a_stream(
    mode: str,
    start_broker: StartBroker,
    redis_client: aioredis.Redis,
    redis_server: Any,
) -> None:
    broker = await start_broker(*broker_settings(mode))
    if mode == "stream":  # stream ids from real times, and a reader past its start
        await redis_client.xadd(STREAM_KEY, {"channel": "warm", "data": "0"})
    good = Good(mode, redis_client)
    # The p99 of a ~1 ms latency on a shared machine moves with whatever else runs:
    # a measurement that breaks the bound is repeated, and the verdict is the
    # majority of up to three (a flood that really slows the stream fails them all).
    summaries: list[str] = []
    verdicts: list[bool] = []
    async with SSEClient.connect(broker.events_url("good")) as stream:
        assert stream.status == 200, await stream.text()
        await stream.wait_for(lambda s: "ok" in s.parser.comments, what="the preamble")
        reader = Reader(stream)
        try:
            while verdicts.count(True) < 2 and verdicts.count(False) < 2:
                attempt = await measure(broker, mode, redis_server.url, good, reader)
                base, loud = latencies_ms(reader, good, attempt)
                verdicts.append(p99(loud) <= 2 * p99(base))
                summaries.append(summarize(mode, attempt, base, loud))
                print(summaries[-1])
                if len(verdicts) == 1 and verdicts[0]:
                    break
        finally:
            reader.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader.task

    # Every good event, in order, and nothing else.
    got = [(seq, kind) for _, seq, kind, _ in reader.received]
    assert got == [(n, "good") for n in range(1, good.seq + 1)], (
        f"{len(got)} events; not the good ones in order: "
        f"{[r for r in reader.received if r[2] != 'good' or r[1] < 0][:5]}"
    )
    # Nothing went wrong inside.
    log = broker.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    # The stream's latency: p99 under the flood at most twice the baseline.
    assert verdicts.count(True) > verdicts.count(False), "\n".join(summaries)


def summarize(mode: str, attempt: Attempt, base: list[float], loud: list[float]) -> str:
    expected = attempt.expected()

    def stats(values: list[float]) -> str:
        ordered = sorted(values)
        return f"{ordered[len(ordered) // 2]:.2f}/{p99(values):.2f}/{ordered[-1]:.2f}"

    return (
        f"{mode}: {attempt.report['sent']:,} malformed messages at {attempt.rate:,.0f}/s "
        f"({sum(expected.values()):,} rejected: {dict(expected)}); good events "
        f"{GOOD_RATE}/s, {len(base)} in quiet windows, {len(loud)} in flood windows: "
        f"p50/p99/max {stats(base)} ms quiet, {stats(loud)} ms flood "
        f"(p99 x{p99(loud) / p99(base):.2f}); worst /readyz "
        f"{max(t for _, t in attempt.answers) * 1000:.0f} ms"
    )
