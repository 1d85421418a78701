"""Tenancy as a property: every connection receives exactly the events it may see.

One broker in jwt mode serves every hypothesis example (each example works on
channels under its own prefix), run once per ingest mode that takes PUBLISH:
``pubsub`` (history and retained state in the process) and ``bridge`` (the same
PUBLISHes appended to a Redis stream by the lease holder, served from it:
stream ids, retained state in Redis). The oracle is the same for both.

An example draws a few identities (user, tenant, granted channel patterns,
wanted channels) and three batches of events (channel, tenant, users,
retain), then:

1. opens a stream per identity (an ungranted channel must be refused with 403
   naming it; the granted ones are subscribed) and publishes batch 1 live;
2. drops some streams, publishes batch 2, resumes them with ``Last-Event-ID``
   (the replay path), then publishes batch 3 live to everyone;
3. opens fresh streams after all that (the retained path).

The oracle is computed here from the drawn data alone (never from broker
code): an event reaches a connection iff its channel is subscribed, its
tenant (if any) equals the connection's and its users (if any) contain the
connection's user; integers compare as decimal strings. Each batch ends with
a fence event on every channel, so "exactly" covers both leaks and losses.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import BrokerProcess, StartBroker
from helpers import eventually
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sse_client import SSEClient, SSEStream

SECRET = "tenancy-property-secret-" + "0123456789abcdef" * 4

# Channels relative to an example's prefix P: "news" is "P.news"; "private-orders"
# is "private-P.orders".
UNIVERSE = (
    "news",
    "tenant.t1.feed",
    "tenant.t2.feed",
    "tenant.5.feed",
    "user.u1",
    "user.42",
    "private-orders",
)
# Grant patterns put in the token's channels claim (placeholders expanded by the broker).
TEMPLATES = {
    "news": "{P}.news",
    "own_tenant": "{P}.tenant.{{tenant}}.*",
    "own_user": "{P}.user.{{user}}",
    "everything": "{P}.*",
    "private": "private-{P}.*",
    "tenant_t1": "{P}.tenant.t1.*",  # a cross-tenant grant: tenant-scoped events still filter
}
# auth.grants of the broker: every identity may read its own user channel.
CONFIG_GRANTS = "['*.user.{user}']"
# The event ids each mode hands out: the bridge serves from the stream.
ID_FORMS = {"pubsub": re.compile(r"p[0-9]+-[0-9]+"), "bridge": re.compile(r"[0-9]+-[0-9]+")}


def channel_name(prefix: str, key: str) -> str:
    return f"private-{prefix}.orders" if key == "private-orders" else f"{prefix}.{key}"


@dataclass(frozen=True)
class Ident:
    user: str | None
    tenant: str | None
    grants: frozenset[str]
    wanted: frozenset[str]


@dataclass(frozen=True)
class Ev:
    channel: str  # a UNIVERSE key
    tenant: str | int | None = None
    users: tuple[str | int, ...] | None = None
    retain: str | bool | None = None


@dataclass(frozen=True)
class Scenario:
    idents: tuple[Ident, ...]
    batches: tuple[tuple[Ev, ...], tuple[Ev, ...], tuple[Ev, ...]]
    drop: tuple[bool, ...]


identities = st.builds(
    Ident,
    user=st.sampled_from(["u1", "u2", "u3", "42", "7", None]),
    tenant=st.sampled_from(["t1", "t2", "5", None]),
    grants=st.frozensets(st.sampled_from(sorted(TEMPLATES)), max_size=3),
    wanted=st.frozensets(st.sampled_from(UNIVERSE), min_size=1, max_size=3),
)


@st.composite
def events(draw: st.DrawFn) -> Ev:
    users = draw(
        st.none()
        | st.lists(
            st.sampled_from(["u1", "u2", "u3", 42, "42", 7, "7"]), min_size=1, max_size=3
        ).map(tuple)
    )
    # retained state is per channel and tenant: never combined with users
    retain = None if users is not None else draw(st.sampled_from([None, None, "k1", "k2", True]))
    return Ev(
        channel=draw(st.sampled_from(UNIVERSE)),
        tenant=draw(st.sampled_from([None, None, "t1", "t2", 5, "5"])),
        users=users,
        retain=retain,
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    idents = tuple(draw(st.lists(identities, min_size=1, max_size=4)))
    batch = st.lists(events(), max_size=8).map(tuple)
    drop = tuple(draw(st.lists(st.booleans(), min_size=len(idents), max_size=len(idents))))
    return Scenario(idents, (draw(batch), draw(batch), draw(batch)), drop)


# -- the oracle (independent of broker code) -----------------------------------------------


def grant_allows(template: str, ident: Ident, key: str) -> bool:
    """Whether grant ``template`` lets ``ident`` subscribe UNIVERSE channel ``key``."""
    if template == "news":
        return key == "news"
    if template == "own_tenant":
        return ident.tenant is not None and key.startswith(f"tenant.{ident.tenant}.")
    if template == "own_user":
        return ident.user is not None and key == f"user.{ident.user}"
    if template == "everything":
        return key != "private-orders"
    if template == "private":
        return key == "private-orders"
    if template == "tenant_t1":
        return key.startswith("tenant.t1.")
    raise AssertionError(template)


def granted(ident: Ident, key: str) -> bool:
    config_grant = ident.user is not None and key == f"user.{ident.user}"
    return config_grant or any(grant_allows(t, ident, key) for t in ident.grants)


@dataclass(frozen=True)
class Published:
    ev: Ev
    data: str  # unique per event


def may_see(ident: Ident, subscribed: frozenset[str], pub: Published) -> bool:
    ev = pub.ev
    if ev.channel not in subscribed:
        return False
    if ev.tenant is not None and str(ev.tenant) != ident.tenant:
        return False
    return ev.users is None or (ident.user is not None and ident.user in map(str, ev.users))


def expected(ident: Ident, subscribed: frozenset[str], published: Sequence[Published]) -> list[str]:
    return [p.data for p in published if may_see(ident, subscribed, p)]


def retained_state(
    ident: Ident, subscribed: frozenset[str], published: Sequence[Published]
) -> list[str]:
    """The newest retained event per (channel, tenant, key) the connection may see, in
    publish order. ``retain: true`` keys by the event name (``message`` here)."""
    latest: dict[tuple[str, str | None, str], tuple[int, Published]] = {}
    for i, pub in enumerate(published):
        ev = pub.ev
        if ev.retain is None:
            continue
        key = "message" if ev.retain is True else str(ev.retain)
        tenant = None if ev.tenant is None else str(ev.tenant)
        latest[(ev.channel, tenant, key)] = (i, pub)
    return [p.data for _, p in sorted(latest.values()) if may_see(ident, subscribed, p)]


# -- driving the broker --------------------------------------------------------------------

_EXAMPLES = itertools.count()
_BROKERS: dict[int, BrokerProcess] = {}


async def the_broker(start_broker: StartBroker, mode: str) -> BrokerProcess:
    """One broker for all examples of the test run (keyed by the fixture instance)."""
    key = id(start_broker)
    broker = _BROKERS.get(key)
    if broker is None or broker.returncode is not None:
        _BROKERS.clear()
        broker = _BROKERS[key] = await start_broker(
            "auth.mode=jwt",
            f"auth.jwt.secret={SECRET}",
            f"auth.grants={CONFIG_GRANTS}",
            "auth.jwt.leeway_seconds=0",
            "sse.heartbeat_seconds=300",  # no id-only heartbeats mid-example
            f"ingest.mode={mode}",
        )
        if mode == "bridge":
            # Ready is not leading: a PUBLISH before the lease is taken is
            # heard by nobody who appends it.
            await eventually(
                lambda: broker.metric("sse_broker_bridge_leader"), lambda v: v == 1, timeout=15
            )
    return broker


def token_for(prefix: str, ident: Ident) -> str:
    claims: dict[str, Any] = {
        "exp": int(time.time()) + 600,
        "channels": [TEMPLATES[t].format(P=prefix) for t in sorted(ident.grants)],
    }
    if ident.user is not None:
        claims["sub"] = ident.user
    if ident.tenant is not None:
        claims["tenant"] = ident.tenant
    return jwt.encode(claims, SECRET, algorithm="HS256")


@contextlib.asynccontextmanager
async def open_stream(
    broker: BrokerProcess,
    prefix: str,
    ident: Ident,
    subscribed: frozenset[str],
    last_event_id: str | None = None,
) -> AsyncIterator[SSEStream]:
    channels = [channel_name(prefix, k) for k in sorted(subscribed)]
    headers = {"Authorization": f"Bearer {token_for(prefix, ident)}"}
    async with SSEClient.connect(
        broker.events_url(*channels), headers=headers, last_event_id=last_event_id
    ) as s:
        assert s.status == 200, (ident, channels, await s.text())
        await s.wait_for(lambda st: "ok" in st.parser.comments, what="the preamble")
        yield s


class Publisher:
    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.published: list[Published] = []
        self._n = 0

    async def batch(self, evs: Sequence[Ev]) -> list[Published]:
        """Publish ``evs`` then a fence on every channel, in one pipelined round trip."""
        fences = [Ev(channel=key) for key in UNIVERSE]
        out: list[Published] = []
        pipe = self.redis.pipeline(transaction=False)
        for ev in [*evs, *fences]:
            self._n += 1
            data = f"{self.prefix}-e{self._n}"
            body: dict[str, Any] = {"data": data}
            if ev.tenant is not None:
                body["tenant"] = ev.tenant
            if ev.users is not None:
                body["users"] = list(ev.users)
            if ev.retain is not None:
                body["retain"] = ev.retain
            pipe.publish("sse:" + channel_name(self.prefix, ev.channel), orjson.dumps(body))
            out.append(Published(ev, data))
        await pipe.execute()
        self.published.extend(out)
        return out


async def receive(s: SSEStream, want: list[str], what: str) -> None:
    """Exactly ``want`` arrives, in order, as plain events (no reset, no control event).

    ``want`` ends with a fence (the last event published, visible to all), so
    once it is in, everything before it is too: a loss shows as fast as a leak.
    """
    await s.wait_for(
        lambda st: any(e.data == want[-1] for e in st.pending), timeout=5, what=want[-1]
    )
    got = await s.events(len(s.pending))
    assert [(e.type, e.data) for e in got] == [("message", d) for d in want], what


async def refused_403(
    http: aiohttp.ClientSession, broker: BrokerProcess, prefix: str, ident: Ident
) -> None:
    channels = [channel_name(prefix, k) for k in sorted(ident.wanted)]
    ungranted = {channel_name(prefix, k) for k in ident.wanted if not granted(ident, k)}
    headers = {"Authorization": f"Bearer {token_for(prefix, ident)}"}
    async with http.get(broker.events_url(*channels), headers=headers) as resp:
        body = orjson.loads(await resp.read())
    assert resp.status == 403, (ident, body)
    named = body["message"].split("'")[1]
    assert named in ungranted, (ident, body)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pubsub", "bridge"])
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
async def test_every_connection_gets_exactly_what_it_may_see(
    start_broker: StartBroker,
    redis_client: aioredis.Redis,
    http: aiohttp.ClientSession,
    mode: str,
    scenario: Scenario,
) -> None:
    broker = await the_broker(start_broker, mode)
    prefix = f"p{next(_EXAMPLES)}"
    pub = Publisher(redis_client, prefix)

    # who subscribes what: the granted part of what they want
    members: list[tuple[Ident, frozenset[str], bool]] = []
    for ident, drop in zip(scenario.idents, scenario.drop, strict=True):
        subscribed = frozenset(k for k in ident.wanted if granted(ident, k))
        if subscribed != ident.wanted:
            await refused_403(http, broker, prefix, ident)
        if subscribed:
            members.append((ident, subscribed, drop))

    event(f"streams: {len(members)}")
    async with contextlib.AsyncExitStack() as stack:
        streams: list[SSEStream] = []
        for ident, subscribed, _ in members:
            streams.append(
                await stack.enter_async_context(open_stream(broker, prefix, ident, subscribed))
            )

        # 1. live
        batch1 = await pub.batch(scenario.batches[0])
        for (ident, subscribed, _), s in zip(members, streams, strict=True):
            await receive(s, expected(ident, subscribed, batch1), f"live batch 1 for {ident}")

        # 2. some leave; what they miss is replayed on resume, then live again
        resume_from: dict[int, str] = {}
        for i, ((_, _, drop), s) in enumerate(zip(members, streams, strict=True)):
            if drop:
                resume_from[i] = s.parser.last_event_id
                assert ID_FORMS[mode].fullmatch(resume_from[i]), (mode, resume_from[i])
                s.disconnect()
        batch2 = await pub.batch(scenario.batches[1])
        for i, (ident, subscribed, _) in enumerate(members):
            if i in resume_from:
                streams[i] = await stack.enter_async_context(
                    open_stream(broker, prefix, ident, subscribed, resume_from[i])
                )
                what = f"replay of batch 2 for {ident} from {resume_from[i]}"
            else:
                what = f"live batch 2 for {ident}"
            await receive(streams[i], expected(ident, subscribed, batch2), what)
        batch3 = await pub.batch(scenario.batches[2])
        for (ident, subscribed, _), s in zip(members, streams, strict=True):
            await receive(s, expected(ident, subscribed, batch3), f"live batch 3 for {ident}")

    # 3. fresh streams: the retained state they may see, then live events
    async with contextlib.AsyncExitStack() as stack:
        fresh = [
            await stack.enter_async_context(open_stream(broker, prefix, ident, subscribed))
            for ident, subscribed, _ in members
        ]
        state = [retained_state(ident, sub, pub.published) for ident, sub, _ in members]
        batch4 = await pub.batch(())
        for (ident, subscribed, _), s, st in zip(members, fresh, state, strict=True):
            want = st + expected(ident, subscribed, batch4)
            await receive(s, want, f"retained state, then live, for {ident}")
