"""``POST /publish`` on the admin listener (real redis-server, real broker processes).

Publishing writes to Redis in the configured mode and never delivers locally,
so what a client receives here went through Redis like any other event.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import BrokerProcess, RedisServer, StartBroker
from helpers import fence, fence_stream
from multidict import CIMultiDictProxy
from sse_client import SSEClient, SSEStream

KEY = "k"
WITH_KEY = "publish.keys=['k']"
STREAM_MODE = "ingest.mode=stream"
STREAM_ID_RE = re.compile(r"^\d+-\d+$")


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(
    http: aiohttp.ClientSession,
    broker: BrokerProcess,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    """POST ``body`` as JSON (or ``raw``) to the admin ``/publish``: (status, json, headers)."""
    data = io.BytesIO(raw if raw is not None else orjson.dumps(body))
    async with http.post(
        f"{broker.admin_url}/publish",
        data=data,
        headers={"Content-Type": "application/json", **bearer(), **(headers or {})},
    ) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json(), resp.headers


@contextlib.asynccontextmanager
async def stream(broker: BrokerProcess, *channels: str) -> AsyncIterator[SSEStream]:
    """An open stream, returned once registered (its preamble and head id arrived)."""
    async with SSEClient.connect(broker.events_url(*channels)) as s:
        assert s.status == 200, await s.text()
        await s.wait_for(lambda st: st.parser.last_event_id != "", what="the preamble")
        yield s


# -- enabling and authentication -------------------------------------------------------


async def test_publish_is_disabled_without_keys(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker()
    status, body, _ = await post(http, broker, {"channel": "news", "data": 1})
    assert status == 404
    assert body["error"] == "publish_disabled"
    assert "publish.keys" in body["message"]


async def test_public_listener_has_no_publish_endpoint(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    broker = await start_broker(WITH_KEY)
    body = orjson.dumps({"channel": "news", "data": 1})
    for path in ("/publish", "/events/publish"):
        async with http.post(broker.url + path, data=body, headers=bearer()) as resp:
            assert resp.status in (404, 405), path
    async with http.post(broker.events_url("news"), data=body, headers=bearer()) as resp:
        assert resp.status in (404, 405)


async def test_publish_requires_a_valid_bearer_key(
    start_broker: StartBroker, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys_file = tmp_path / "publish.keys"
    keys_file.write_text("from-file-1\n\n  from-file-2  \n")
    broker = await start_broker(WITH_KEY, f"publish.keys_file='{keys_file}'")
    envelope = {"channel": "news", "data": 1}
    refused = [
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer k2"},
        {"Authorization": "Bearer kk"},
        {"Authorization": "Basic k"},
        {"Authorization": "k"},
        {"Authorization": "Bearer from-file-1 from-file-2"},
    ]
    for headers in refused:
        status, body, answer = await post(http, broker, envelope, headers=headers)
        assert status == 401, headers
        assert body["error"] == "unauthorized", headers
        assert "Bearer" in body["message"]
        assert answer["WWW-Authenticate"].startswith("Bearer"), headers
    for key in (KEY, "from-file-1", "from-file-2"):
        status, body, _ = await post(http, broker, envelope, headers=bearer(key))
        assert (status, body) == (200, {"published": 1, "ids": []}), key
    # the scheme is case-insensitive, as HTTP wants
    status, _, _ = await post(http, broker, envelope, headers={"Authorization": "bearer k"})
    assert status == 200


async def test_a_keys_file_alone_enables_publish(
    start_broker: StartBroker, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys_file = tmp_path / "publish.keys"
    keys_file.write_text("only-key\n")
    broker = await start_broker(f"publish.keys_file='{keys_file}'")
    envelope = {"channel": "news", "data": 1}
    status, _, _ = await post(http, broker, envelope, headers=bearer("only-key"))
    assert status == 200
    status, body, _ = await post(http, broker, envelope, headers=bearer(KEY))
    assert (status, body["error"]) == (401, "unauthorized")


# -- pub/sub mode ------------------------------------------------------------------------


@pytest.mark.slow
async def test_single_envelope_goes_through_redis_to_every_instance(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    a = await start_broker(WITH_KEY)
    b = await start_broker()  # publishing is not local: B delivers it too
    async with stream(a, "news") as on_a, stream(b, "news") as on_b:
        status, body, _ = await post(
            http, a, {"channel": "news", "data": {"id": 7, "name": "x"}, "event": "updated"}
        )
        assert (status, body) == (200, {"published": 1, "ids": []})
        for s in (on_a, on_b):
            event = await s.next_event()
            assert (event.type, event.data) == ("updated", '{"id":7,"name":"x"}')

        # filtered like the native format: tenant and users restrict the audience
        for item in (
            {"channel": "news", "data": "for acme", "tenant": "acme"},
            {"channel": "news", "data": "for tenant 42", "tenant": 42},
            {"channel": "news", "data": "for bob", "users": ["bob", 7]},
            {"channel": "news", "data": "a string, verbatim"},
            {"channel": "other", "data": "another channel"},
        ):
            status, body, _ = await post(http, a, item)
            assert (status, body) == (200, {"published": 1, "ids": []}), item
        for s in (on_a, on_b):
            event = await s.next_event()
            assert (event.type, event.data) == ("message", "a string, verbatim")
        assert await fence(redis_client, "news", on_a, on_b) == [[], []]


@pytest.mark.slow
async def test_a_list_of_envelopes_is_published_in_order(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker(WITH_KEY)
    items = [
        {"channel": "a" if i % 2 else "b", "data": {"i": i}, "event": f"e{i}"} for i in range(20)
    ]
    items.append({"channel": "c", "data": "not subscribed"})
    async with stream(broker, "a", "b") as s:
        status, body, _ = await post(http, broker, items)
        assert (status, body) == (200, {"published": 21, "ids": []})
        got = await s.events(20)
        assert await fence(redis_client, "a", s) == [[]]
    assert [(e.type, e.json()) for e in got] == [(f"e{i}", {"i": i}) for i in range(20)]


# -- stream mode --------------------------------------------------------------------------


@pytest.mark.slow
async def test_stream_mode_answers_the_stream_ids_clients_see(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker(STREAM_MODE, WITH_KEY)
    visible = [
        {"channel": "news", "data": {"n": 1}, "event": "updated"},
        {"channel": "news", "data": "plain\ntwo lines"},
        {"channel": "news", "data": [1, 2], "retain": "list"},
    ]
    restricted = [
        {"channel": "news", "data": {"n": 2}, "event": "e", "tenant": 7},
        {"channel": "news", "data": "for bob", "users": ["bob", 3]},
        {"channel": "news", "data": None, "retain": "list"},
        {"channel": "news", "data": "retained as the event name", "event": "price", "retain": True},
    ]
    async with stream(broker, "news") as s:
        status, body, _ = await post(http, broker, visible)
        assert status == 200
        assert body["published"] == 3
        ids = body["ids"]
        assert len(ids) == 3 and all(STREAM_ID_RE.match(i) for i in ids)
        got = await s.events(3)
        assert [(e.type, e.data, e.last_event_id) for e in got] == [
            ("updated", '{"n":1}', ids[0]),
            ("message", "plain\ntwo lines", ids[1]),
            ("message", "[1,2]", ids[2]),
        ]
        status, body, _ = await post(http, broker, restricted)
        assert (status, body["published"], len(body["ids"])) == (200, 4, 4)
        ids += body["ids"]
        # the tenant's and bob's events are filtered; the deletion and the rest arrive
        got = await s.events(2)
        assert [(e.type, e.data, e.last_event_id) for e in got] == [
            ("message", "null", ids[5]),
            ("price", "retained as the event name", ids[6]),
        ]
        assert await fence_stream(redis_client, "news", s) == [[]]
        marker = s.parser.last_event_id

    # what /publish wrote, then the fence's marker (the test's own entry)
    entries = await redis_client.xrange("sse:stream")
    assert [id.decode() for id, _ in entries] == [*ids, marker]
    *fields, fence_fields = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
    assert fence_fields.keys() == {"channel", "data"} and fence_fields["channel"] == "news"
    assert fields == [
        {"channel": "news", "data": '{"n":1}', "event": "updated"},
        {"channel": "news", "data": "plain\ntwo lines"},
        {"channel": "news", "data": "[1,2]", "retain": "list"},
        {"channel": "news", "data": '{"n":2}', "event": "e", "tenant": "7"},
        {"channel": "news", "data": "for bob", "users": '["3","bob"]'},
        {"channel": "news", "data": "null", "retain": "list"},
        {
            "channel": "news",
            "data": "retained as the event name",
            "event": "price",
            "retain": "price",
        },
    ]


@pytest.mark.slow
async def test_stream_mode_delivers_every_event_publish_accepted(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    # The size limit must mean the same for /publish and for the stream reader:
    # an event answered with 200 and an id must reach its subscribers.
    limit = 1000
    broker = await start_broker(STREAM_MODE, WITH_KEY, f"limits.max_event_bytes={limit}")
    channel = "tenant.acme.orders." + "x" * 150
    data = "y" * (limit - 20)
    async with stream(broker, channel) as s:
        status, body, _ = await post(http, broker, {"channel": channel, "data": data})
        if status == 200:
            try:
                event = await s.next_event(timeout=2)
            except TimeoutError:
                rejected = await broker.metric(
                    "sse_broker_events_rejected_total", {"reason": "too_large"}
                )
                pytest.fail(
                    f"/publish answered 200 with id {body['ids'][0]}, but the event never "
                    f"arrived: the stream reader rejected it (rejected too_large = {rejected})",
                    pytrace=False,
                )
            assert (event.data, event.last_event_id) == (data, body["ids"][0])
        else:
            assert (status, body["error"]) == (400, "too_large")
        assert await fence_stream(redis_client, channel, s) == [[]]
    assert await broker.metric("sse_broker_events_rejected_total") is None


# -- refusals -----------------------------------------------------------------------------

GOOD = {"channel": "news", "data": "fine"}

# (bad envelope, error code, text the message must contain)
BAD_ITEMS: list[tuple[Any, str, str]] = [
    ({"data": 1}, "bad_channel", "'channel'"),
    ({"channel": 5, "data": 1}, "bad_channel", "'channel'"),
    ({"channel": "", "data": 1}, "bad_channel", "channel"),
    ({"channel": "has space", "data": 1}, "bad_channel", "'has space'"),
    ({"channel": "x" * 201, "data": 1}, "bad_channel", "channel"),
    ({"channel": "news"}, "bad_data", "'data'"),
    ({"channel": "news", "data": 1, "event": "broker.reset"}, "reserved_event", "broker.reset"),
    ({"channel": "news", "data": 1, "event": "a\ndata: x"}, "bad_event", "'event'"),
    ({"channel": "news", "data": 1, "event": 5}, "bad_event", "'event'"),
    ({"channel": "news", "data": 1, "tenant": True}, "bad_tenant", "'tenant'"),
    ({"channel": "news", "data": 1, "tenant": ["acme"]}, "bad_tenant", "'tenant'"),
    ({"channel": "news", "data": 1, "users": "bob"}, "bad_users", "'users'"),
    ({"channel": "news", "data": 1, "users": []}, "bad_users", "'users'"),
    ({"channel": "news", "data": 1, "retain": 5}, "bad_retain", "'retain'"),
    (
        {"channel": "news", "data": 1, "retain": "k", "users": ["bob"]},
        "retain_with_users",
        "'retain'",
    ),
    ("just a string", "bad_envelope", "object"),
    (5, "bad_envelope", "object"),
    (["nested"], "bad_envelope", "object"),
    ({"channel": "news", "data": "x" * 300}, "too_large", "limits.max_event_bytes"),
]


@pytest.mark.slow
async def test_invalid_bodies_are_400_naming_the_field_and_the_item(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    broker = await start_broker(WITH_KEY, "limits.max_event_bytes=256")
    async with stream(broker, "news") as s:
        for raw, code in (
            (b"{not json", "bad_json"),
            (b"", "bad_json"),
            (b"[]", "no_events"),
            (orjson.dumps([GOOD] * 1001), "too_many"),
        ):
            status, body, _ = await post(http, broker, None, raw=raw)
            assert (status, body["error"]) == (400, code), raw[:50]
            assert body["message"]
        for bad, code, text in BAD_ITEMS:
            if not isinstance(bad, list):
                # alone
                status, body, _ = await post(http, broker, bad)
                assert (status, body["error"]) == (400, code), bad
                assert text in body["message"], (bad, body)
            # in a list, after a valid item: the index is named, nothing is published
            status, body, _ = await post(http, broker, [GOOD, bad, GOOD])
            assert (status, body["error"]) == (400, code), bad
            assert body["message"].startswith("item 1: "), (bad, body)
            assert text in body["message"], (bad, body)
        assert await fence(redis_client, "news", s) == [[]]
        status, body, _ = await post(http, broker, {"channel": "news", "data": "the only one"})
        assert status == 200
        assert (await s.next_event()).data == "the only one"
        assert await fence(redis_client, "news", s) == [[]]
    # "the only one" and the two fences' markers: no refused item reached Redis
    assert await broker.metric("sse_broker_events_ingested_total") == 3


async def test_a_body_over_the_size_limit_is_413(
    start_broker: StartBroker, http: aiohttp.ClientSession
) -> None:
    # the body limit follows limits.max_event_bytes (here: at its floor of 1 MiB)
    broker = await start_broker(WITH_KEY, "limits.max_event_bytes=1000")
    huge = orjson.dumps({"channel": "news", "data": "x" * (2 << 20)})
    status, body, _ = await post(http, broker, None, raw=huge)
    assert (status, body["error"]) == (413, "too_large")


# -- Redis down ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pubsub", "stream"])
async def test_publish_answers_503_while_redis_is_down(
    start_broker: StartBroker, http: aiohttp.ClientSession, redis_server: RedisServer, mode: str
) -> None:
    broker = await start_broker(f"ingest.mode={mode}", WITH_KEY)
    redis_server.stop()
    status, body, headers = await post(http, broker, GOOD)
    assert status == 503
    assert body["error"] == "redis_unavailable"
    assert int(headers["Retry-After"]) >= 1
    redis_server.start()
    await broker.wait_ready()
    async with stream(broker, "news") as s:
        status, body, _ = await post(http, broker, GOOD)
        assert status == 200
        assert body["published"] == 1
        assert (await s.next_event()).data == "fine"
