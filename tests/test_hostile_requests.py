"""Hostile requests: a property-based fuzz of the whole request surface (issue 11).

Hypothesis generates whole HTTP requests -- method, request target (path,
channel lists, ``token``, ``last_event_id``, ``socket_id``, random keys,
percent-encoded junk), version, headers (``Last-Event-ID``,
``Authorization`` with junk, forged, mis-signed and valid JWTs, ``Cookie``,
``Origin``, ``X-Forwarded-For``, ``Accept``, ``Expect``, fillers up to
aiohttp's 8190-byte limit, duplicates) and bodies; about one request in four
also carries one deliberate flaw that makes it unparseable (a bad method or
version, a line or target past the limit, 129+ header lines, a control byte,
a second ``Host``/``Content-Length``/..., a bad header name, bad framing) --
and sends them as raw bytes over
a socket (no HTTP client in the way, so bytes aiohttp's own client would
refuse go out too) to three real brokers on one Redis, all with
``auth.public_channels = ["pub.*"]`` and CORS origins: pub/sub mode with
``auth.mode = "jwt"`` behind a trusted proxy (``X-Forwarded-For`` believed);
stream mode with jwt, an untrusted peer and JSON logs; pub/sub mode with
``auth.mode = "callback"`` and the app down (:func:`broker_settings`).

Every answer is checked against an oracle computed from the drawn request
alone, from the README's rules, never from broker code (:func:`expectation`):

- *unparseable* (:func:`unparseable`: a target or header value past 8190
  bytes -- for the first header, name and value together --, more than 128
  header lines, a control byte in a header value, a bad method or version,
  a byte outside ``!``..``~`` in the target, no ``Host`` in HTTP/1.1, a
  second RFC 9110 singleton such as ``Host`` or ``User-Agent``,
  Content-Length with Transfer-Encoding, ...): exactly 400 from aiohttp's
  parser, ``text/plain`` (or the connection reset while our bytes were
  still arriving); a request followed by junk may get that 400 instead of
  its own answer;
- an unknown path: 404 and a known path with another method: 405, aiohttp's
  ``text/plain``; ``Expect`` other than ``100-continue`` in HTTP/1.1: 417
  (aiohttp's, on any route). None of 404/405/417 is in the README's table:
  they come from aiohttp, not from the broker;
- ``OPTIONS /events``: 204, CORS headers exactly for an allowed origin;
- ``/healthz``, ``/readyz``: 200 JSON (``/readyz`` 503 allowed);
- ``GET /events``: no channel / too many / a bad name: 400 JSON naming the
  problem; otherwise, by the credentials (first present wins): none and all
  channels public -> 200; none and a channel not public -> 401; a token that
  does not carry a valid HS256 signature by the broker's secret -> 401, so
  no forged token opens anything; a signed token -> 200, 401 or 403; in
  callback mode, ``Authorization`` -> 503 (the app is down: fail closed);
  plus the retryable 429/503 -- which are a 200 carrying ``broker.reconnect``
  when ``Accept`` has ``text/event-stream``. ``Last-Event-ID`` never changes
  the status (README: "never a 400 for an id");
- every broker-made refusal is ``application/json`` with string ``error``
  and ``message`` (401 with ``WWW-Authenticate``, 429/503 with
  ``Retry-After``, 403 naming a requested channel); every 200 stream
  delivers its preamble (``retry:`` and ``: ok``, or ``broker.reconnect``)
  before it may be closed; every routed answer carries CORS headers exactly
  when the (first) ``Origin`` is allowed; never a 500.

After each batch: no ``Traceback`` and no ``ERROR`` line in either broker's
log (when there is one, each request of the batch is replayed alone to name
the one that causes it), and ``sse_broker_connections`` back to 0. The RSS of
each broker may grow by at most 2 MiB from the end of the warm-up (a fixed
batch of classic attacks, :func:`classics`, then three generated batches of
50) to the end of the main run (eleven batches: 550 generated requests).
Shrinking is off: a failing batch is reported request by request instead,
with the exact bytes.

The generator and the checks are plain functions so that
``tests/bench/hostile.py`` sends 10,000+ of the same requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import functools
import hashlib
import hmac
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_to_bytes

import orjson
import pytest
from helpers import eventually, metric_value
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

if TYPE_CHECKING:
    from conftest import StartBroker

# -- the brokers under test ------------------------------------------------------------------------

SECRET = "hostile-requests-secret-" + "0123456789abcdef" * 3
PUBLIC = "pub.*"
CORS_ORIGINS = ("https://app.example.com", "https://*.example.org")
MAX_CHANNELS = 32  # limits.max_channels_per_connection (default)
STREAM_KEY = "sse:stream"


MODES = ("pubsub", "stream", "callback")
# Nothing listens there: the callback app is down, so every call fails closed (503).
DOWN_APP = "http://127.0.0.1:9/sse/auth"


def broker_settings(mode: str) -> list[str]:
    """The ``--set`` flags of the broker called ``mode`` (one of :data:`MODES`).

    pubsub: jwt auth, behind a trusted proxy (the test's 127.0.0.1), so
    ``X-Forwarded-For`` picks the client address; stream: jwt auth, stream
    ingest, the peer is not trusted, and the log is JSON lines; callback:
    pub/sub, ``auth.mode = "callback"`` with the app down. pubsub and stream
    count at most 2 / 3 streams per address, so concurrent requests meet the
    retryable refusal too.
    """
    common = [
        f"auth.public_channels=['{PUBLIC}']",
        "server.cors_origins=[" + ", ".join(f"'{o}'" for o in CORS_ORIGINS) + "]",
        "sse.heartbeat_seconds=300",
        "log.level=info",
    ]
    if mode == "callback":
        return [*common, "auth.mode=callback", f"auth.callback.url={DOWN_APP}"]
    common += ["auth.mode=jwt", f"auth.jwt.secret={SECRET}"]
    if mode == "pubsub":
        return [*common, "server.trusted_proxies=['127.0.0.1']", "limits.max_connections_per_ip=2"]
    return [
        *common,
        "ingest.mode=stream",
        f"ingest.stream_key={STREAM_KEY}",
        "log.format=json",  # what a log shipper reads: every value must survive orjson
        "server.trusted_proxies=['10.0.0.0/8', '::1']",
        "limits.max_connections_per_ip=3",
    ]


@dataclass
class Target:
    """One broker as the fuzz sees it."""

    name: str
    host: str
    port: int
    admin_port: int
    pid: int
    log_path: Path
    epoch: bytes = b"0"  # pubsub: the process epoch; stream: a recent stream-id ms
    auth: str = "jwt"  # or "callback" (the app down)
    log_offset: int = 0

    def log_since(self) -> str:
        """What the broker logged since the last call."""
        with self.log_path.open("rb") as f:
            f.seek(self.log_offset)
            data = f.read()
        self.log_offset += len(data)
        return data.decode(errors="replace")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# -- requests --------------------------------------------------------------------------------------

EPOCH = b"~epoch~"  # replaced by the target broker's epoch when sent
KNOWN_METHODS = (b"GET", b"HEAD", b"OPTIONS", b"POST", b"PUT", b"DELETE", b"PATCH", b"TRACE")
BAD_METHODS = (b"get", b"FOO", b"GETT", b"G(T", b"GET\x00", b"", b"\xffGET", b"GET /")
GOOD_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
BAD_VERSIONS = (b"HTTP/1.2", b"HTTP/9.9", b"HTTX/1.1", b"http/1.1", b"HTTP/1.1 x", b"HTTP/1.01")
MAX_LINE = 8190  # aiohttp: request target and header value at most this long
MAX_HEADER_LINES = 128  # aiohttp refuses more header lines
# aiohttp refuses a second one of these (RFC 9110 singletons).
SINGLETONS = frozenset(
    (b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
     b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent")
)  # fmt: skip

# (raw path, route): route None is a 404; checked against aiohttp 3.14 by hand.
PATHS: tuple[tuple[bytes, str | None], ...] = (
    *[(b"/events", "events")] * 40,
    (b"/event%73", "events"),  # routing matches the decoded path
    (b"http://127.0.0.1/events", "events"),  # absolute form
    *[(b"/healthz", "healthz")] * 2,
    *[(b"/readyz", "readyz")] * 2,
    (b"/metrics", None),  # admin listener only
    (b"/publish", None),
    (b"/admin/disconnect", None),
    (b"/", None),
    (b"/nope", None),
    (b"/events/", None),
    (b"/EVENTS", None),
    (b"//events", None),
    (b"/./events", None),
    (b"/events%2F", None),
    (b"/events%00", None),
    (b"/events;x", None),
    (b"/%ff%00/../events", None),
    (b"/healthz/", None),
)

# A header value byte aiohttp refuses (HTAB and obs-text \x80-\xff are fine).
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True, slots=True)
class QueryItem:
    raw: bytes  # as sent, e.g. b"channel=pub.a"
    key: str | None = None  # decoded; None: this item's decoding is not predicted
    value: str | None = None


@dataclass(frozen=True, slots=True)
class Hostile:
    """One generated request. ``EPOCH`` in it becomes the target's epoch when sent."""

    target: int
    method: bytes
    path: bytes
    route: str | None
    query: tuple[QueryItem, ...]
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes = b""
    trailing: bytes = b""  # bytes after the request (a second, junk request)

    def request_target(self, epoch: bytes) -> bytes:
        target = self.path
        if self.query:
            target += b"?" + b"&".join(q.raw for q in self.query)
        return target.replace(EPOCH, epoch)

    def header_list(self, epoch: bytes) -> list[tuple[bytes, bytes]]:
        return [(n, v.replace(EPOCH, epoch)) for n, v in self.headers]

    def wire(self, epoch: bytes) -> bytes:
        line = self.method + b" " + self.request_target(epoch)
        if self.version:
            line += b" " + self.version
        head = b"".join(n + b": " + v + b"\r\n" for n, v in self.header_list(epoch))
        return line + b"\r\n" + head + b"\r\n" + self.body + self.trailing

    def __repr__(self) -> str:
        return f"Hostile(to {self.target}: {self.short(EPOCH, 120)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' reports
        printer.text(repr(self))

    def short(self, epoch: bytes, limit: int = 400) -> str:
        data = self.wire(epoch)
        text = repr(data[:limit])
        return text + (f"... ({len(data)} bytes)" if len(data) > limit else "")


def _one_in(draw: st.DrawFn, n: int) -> bool:
    """True in about one draw of ``n`` (Hypothesis draws the lowest value more often
    than the others: it is not the one that says yes)."""
    return bool(draw(st.integers(0, n - 1)) == 1)


@functools.cache
def _pick(*values: Any) -> st.SearchStrategy[Any]:
    """``st.sampled_from(values)``, built once: strategies made anew on every draw
    cost more (validation) than drawing from them."""
    return st.sampled_from(values)


# -- tokens ----------------------------------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _json(value: Any) -> bytes:
    # json, not orjson: NaN and Infinity are written (as a hostile signer would).
    return json.dumps(value, separators=(",", ":")).encode()


def sign(header: Any, claims: Any, secret: bytes, digest: Any = hashlib.sha256) -> bytes:
    h = header if isinstance(header, bytes) else _json(header)
    c = claims if isinstance(claims, bytes) else _json(claims)
    signing_input = b64(h) + b"." + b64(c)
    return signing_input + b"." + b64(hmac.new(secret, signing_input, digest).digest())


def _lenient_b64(data: bytes) -> bytes | None:
    try:  # as PyJWT decodes: padding added, characters outside the alphabet dropped
        return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    except ValueError:
        return None


def signed_by_us(token: bytes) -> bool:
    """Whether ``token`` carries a valid HS256 signature by the brokers' secret:
    only such a token may ever open a stream that is not public."""
    signing_input, dot, signature = token.rpartition(b".")
    if not dot:
        return False
    given_sig = _lenient_b64(signature)
    expected = hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest()
    return given_sig is not None and hmac.compare_digest(given_sig, expected)


_FUTURE = 10**9  # replaced by "now + 1 h" when drawn


def _exp_values() -> st.SearchStrategy[Any]:
    return st.sampled_from(
        [
            _FUTURE,
            _FUTURE,
            1,
            0,
            -1,
            1e20,
            2**64,
            10**400,
            float("inf"),
            float("nan"),
            "4102444800",
            None,
            True,
            [1],
        ]
    )


_IDS = st.sampled_from(
    [
        "u1",
        42,
        "7",
        "*",
        "{tenant}",
        "{user}",
        "a.b",
        "a\nb",
        "\x00",
        "x" * 300,
        "",
        ["u1"],
        {"a": 1},
        True,
        1.5,
        10**300,
        -5,
        "\u2028",
        "\udcff",
        "é",
    ]
)
_GRANTS = st.sampled_from(
    [
        ["pub.*"],
        ["*"],
        ["priv.*"],
        ["private-*"],
        ["presence-*", "priv.a"],
        "priv.*",
        [1],
        [None],
        ["["],
        ["{user}.*"],
        ["a{tenant}*"],
        ["tenant.{tenant}.*"],
        ["x" * 5000],
        [],
        ["*" * 200],
        ["[!a-z]*", "?" * 50],
    ]
)


_CLAIM_VALUES = (
    ("exp", _exp_values()),
    ("sub", _IDS),
    ("tenant", _IDS),
    ("channels", _GRANTS),
    ("nbf", st.sampled_from([0, 4102444800, "x", float("inf")])),
    ("iat", st.sampled_from([0, 4102444800, "x", float("-inf")])),
    ("aud", st.sampled_from(["x", ["x"], 5])),
    ("iss", st.sampled_from(["x", None])),
)


@st.composite
def claim_sets(draw: st.DrawFn) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    for name, values in _CLAIM_VALUES:
        if draw(st.booleans()) or (name == "exp" and draw(st.booleans())):
            value = draw(values)
            claims[name] = int(time.time()) + 3600 if value is _FUTURE else value
    return claims


_CLAIMS = claim_sets() | st.sampled_from([b"not json", b"[]", b"null", b"\xff"])
_HEADERS = st.sampled_from(
    [
        {"alg": "HS256", "typ": "JWT"},
        {"alg": "HS256", "typ": "JWT"},
        {"alg": "HS256", "kid": "k1"},
        {"alg": "HS256", "kid": ["x"]},
        {"alg": "HS256", "kid": 5},
        {"alg": "HS256", "crit": ["exp"]},
        {"alg": "HS256", "b64": False},
        {"alg": "none"},
        {"alg": "HS512"},
        {"alg": "RS256"},
        {"alg": "ES384"},
        {"alg": ["HS256"]},
        {"alg": None},
        {},
        b"not json",
        b"[]",
        b"\xff\xfe",
    ]
)
_SECRETS = st.sampled_from([SECRET.encode(), SECRET.encode(), b"wrong-secret", b""])


@st.composite
def signed_tokens(draw: st.DrawFn) -> bytes:
    """A JWT signed with HMAC: usually our secret, with odd headers and claims."""
    header = draw(_HEADERS)
    claims: Any = draw(_CLAIMS)
    digest = hashlib.sha512 if _one_in(draw, 10) else hashlib.sha256
    token = sign(header, claims, draw(_SECRETS), digest)
    tamper = draw(_pick(*["none"] * 6 + ["truncate", "empty_sig", "extra", "junk_sig"]))
    if tamper == "truncate":
        token = token[:-3]
    elif tamper == "empty_sig":
        token = token.rpartition(b".")[0] + b"."
    elif tamper == "extra":
        token += b".x"
    elif tamper == "junk_sig":
        token += b"!!"  # dropped by a lenient base64 decoder: still valid for PyJWT
    return token


_SIGNED_TOKENS = signed_tokens()
# Tokens the app could have minted: valid, for various users, tenants and grants.
_GOOD_TOKENS = st.builds(
    lambda sub, tenant, grants: sign(
        {"alg": "HS256", "typ": "JWT"},
        {"exp": int(time.time()) + 3600, "sub": sub, "tenant": tenant, "channels": grants},
        SECRET.encode(),
    ),
    st.sampled_from(["u1", "42", 7, "a.b"]),
    st.sampled_from(["t1", "t2", 5, None]),
    st.sampled_from([["priv.*"], ["*"], [], ["pub.*", "priv.a"], ["private-*"]]),
)
_JUNK_TOKEN_ALPHABET = st.sampled_from(
    [b"a", b"Z", b"0", b"-", b"_", b".", b"=", b"+", b"/", b"%", b'"', b"\xff", b"\xc3\xa9", b" "]
)


@functools.cache
def junk_tokens() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.lists(_JUNK_TOKEN_ALPHABET, max_size=30).map(b"".join),
        st.sampled_from(
            [
                b"a.b",
                b"a.b.c.d",
                b"....",
                b"x",
                b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1MSJ9.",  # alg none
                b"\xff\xfe\xfd",
                b"e30.e30.e30",
            ]
        ),
        st.sampled_from([100, 1000]).map(lambda n: b"A" * n),
    )


@functools.cache
def tokens() -> st.SearchStrategy[bytes]:
    return st.one_of(_GOOD_TOKENS, _GOOD_TOKENS, _SIGNED_TOKENS, _SIGNED_TOKENS, junk_tokens())


# -- header values ---------------------------------------------------------------------------------

# Sizes that parse (up to aiohttp's 8190 bytes), edges included; what does not
# parse comes from the one deliberate flaw a request may carry (FLAWS).
_FILLER_SIZES = st.one_of(
    st.sampled_from([0, 1, 100, 1000, 4000, 8000, MAX_LINE - 1, MAX_LINE]),
    st.integers(0, MAX_LINE),
)
_INNER_SIZES = st.sampled_from([0, 1, 100, 1000, 4000, 8000])  # inside a longer value
_OVERSIZES = st.sampled_from([MAX_LINE + 1, MAX_LINE + 2, 9000, 16000, 65000])


def _printable(value: bytes) -> bytes:
    """``value`` without the control bytes aiohttp refuses in a header value (and
    without CR and LF, which would end the line and start another)."""
    return _BAD_VALUE_BYTE.sub(b"?", value)


@functools.cache
def last_event_ids() -> st.SearchStrategy[bytes]:
    digits = st.sampled_from([1, 5, 19, 20, 21, 40, 4300, 4301, 5000, 8000]).map(lambda n: b"9" * n)
    return st.one_of(
        digits.map(lambda d: EPOCH + b"-" + d),
        st.sampled_from(
            [
                EPOCH + b"-0",
                EPOCH + b"-1",
                EPOCH + b"-18446744073709551615",
                EPOCH + b"-18446744073709551616",
                EPOCH,
                EPOCH + b"-",
                EPOCH + b"-1-1",
                EPOCH + b"-*",
                b"-" + EPOCH,
                b"0-0",
                b"1-1",
                b"-1",
                b"1-",
                b"-",
                b"",
                b" ",
                b"1e3-1",
                b"0x10-1",
                b"+1-+1",
                b" 1-1 ",
                b"1_000-1",
                "١٢٣-٤".encode(),
                b"\xff\xfe",
                b"\xef\xbc\x91-\xef\xbc\x91",  # fullwidth digits
                b"1700000000000-0",
                b"99999999999999999999-0",
                b"18446744073709551616-0",
            ]
        ),
        st.tuples(digits, digits).map(lambda t: t[0] + b"-" + t[1]),
        _INNER_SIZES.map(lambda n: b"1" * n),
        st.binary(max_size=40).map(_printable),
    )


@functools.cache
def authorizations() -> st.SearchStrategy[bytes]:
    return st.one_of(
        tokens().map(lambda t: b"Bearer " + t),
        tokens().map(lambda t: b"bearer " + t),
        tokens().map(lambda t: b"BEARER   " + t + b"  "),
        st.sampled_from(
            [b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz", b"Token abc", b"Bearer a b", b"\xff"]
        ),
        _INNER_SIZES.map(lambda n: b"Bearer " + b"a" * n),
    )


@functools.cache
def cookies() -> st.SearchStrategy[bytes]:
    return st.one_of(
        tokens().map(lambda t: b"sse_token=" + t),
        tokens().map(lambda t: b"a=b; sse_token=" + t + b"; c=d"),
        st.tuples(tokens(), tokens()).map(lambda t: b"sse_token=" + t[0] + b"; sse_token=" + t[1]),
        tokens().map(lambda t: b'sse_token="' + t + b'"'),
        tokens().map(lambda t: b"laravel_session=" + t),
        st.sampled_from(
            [
                b"sse_token=",
                b";;;=;",
                b"=",
                b"a",
                b"$Version=1; sse_token=x",
                b"sse_token=\xff",
                b"laravel_session=abc",
                b"laravel_session=\xff",
                b"laravel_session=",
                b"a=1; laravel_session=x; laravel_session=y",
                b'a="b; sse_token=x"',
            ]
        ),
        _INNER_SIZES.map(lambda n: b"junk=" + b"c" * n),
    )


@functools.cache
def origins() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(
            [
                b"https://app.example.com",
                b"https://APP.example.com",
                b"https://a.example.org",
                b"https://a.b.example.org",
                b"https://example.org",
                b"https://evil.example.org.evil.com",
                b"http://app.example.com",
                b"https://app.example.com/",
                b"null",
                b"",
                b"https://\xe2\x84\xaa.example.org",  # KELVIN SIGN lower-cases to "k"
                b"https://app.example.com\xff",
                b"https://*.example.org",
            ]
        ),
        _INNER_SIZES.map(lambda n: b"https://" + b"a" * n + b".example.org"),
    )


@functools.cache
def forwarded_fors() -> st.SearchStrategy[bytes]:
    ip = st.sampled_from(
        [b"1.2.3.4", b"5.6.7.8", b"::ffff:1.2.3.4", b"2001:db8::1", b"unknown", b"999.9.9.9"]
    )
    return st.one_of(
        ip,
        st.lists(ip, min_size=2, max_size=5).map(b", ".join),
        st.sampled_from([b"junk,,,", b",", b"", b"127.0.0.1", b"10.0.0.1, 127.0.0.1", b"\xff"]),
        st.integers(10, 600).map(
            lambda n: b", ".join(b"10.0.%d.%d" % divmod(i, 256) for i in range(n))
        ),
    )


@functools.cache
def filler_headers() -> st.SearchStrategy[tuple[bytes, bytes]]:
    names = st.sampled_from(
        [
            b"X-Junk",
            b"X-Forwarded-Host",
            b"Cache-Control",
            b"X-Requested-With",
            b"Connection",
            b"Upgrade",
            b"Sec-Fetch-Mode",
            b"Referer",
            b"X" * 40,
        ]
    )
    values = st.one_of(
        _FILLER_SIZES.map(lambda n: b"v" * n),
        st.sampled_from(
            [b"close", b"keep-alive", b"Upgrade", b"websocket", b"h2c", b"a\tb", b"\x80\xff"]
        ),
        st.binary(max_size=30).map(_printable),
    )
    return st.tuples(names, values)


# -- the request strategy --------------------------------------------------------------------------

_POOL = random.Random(11)  # names drawn from pools: a draw per name, not per character
_CHANNEL_CHARS = "ABCXYZabcxyz0189_-.:@=#/"


def _names(prefix: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        size = _POOL.choice([1, 2, 5, 12, 30, 60])
        out.append(prefix + "".join(_POOL.choice(_CHANNEL_CHARS) for _ in range(size)))
    return out


PUBLIC_NAMES = ["pub.a", "pub.b", "pub.x:1", "pub.@=#/", *_names("pub.", 60)]
VALID_NAMES = [
    *PUBLIC_NAMES,
    *_names("priv.", 30),
    *_names("", 30),
    "private-pub.a",
    "presence-x",
    "pub.",
    "pub",
    "PUB.a",
    "pub." + "x" * 196,  # 200 characters: the longest name
]
INVALID_NAMES = [
    "",
    " ",
    "pub a",
    "pub.a\x00",
    "é",
    "../x",
    "pub.a\n",
    "pub.a+",
    "pub." + "x" * 197,  # 201
    "x" * 1000,
    "pub.a?",
    "pub.a&channel=pub.b",
]


@functools.cache
def channel_names() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(VALID_NAMES),
        st.sampled_from(VALID_NAMES),
        st.sampled_from(INVALID_NAMES),
        st.text(max_size=8),
    )


def _encode(text: str) -> bytes:
    return quote(text, safe="-._~:@/").encode()


@st.composite
def query_items(draw: st.DrawFn) -> tuple[QueryItem, ...]:
    mode = draw(_pick(*["public"] * 4 + ["valid"] * 2 + ["wild"] * 3 + ["none"]))
    if mode == "public":
        channels = draw(st.lists(_pick(*PUBLIC_NAMES), min_size=1, max_size=4))
    elif mode == "valid":
        channels = draw(st.lists(_pick(*VALID_NAMES), min_size=1, max_size=8))
    elif mode == "wild":
        channels = draw(st.lists(channel_names(), max_size=40))
    else:
        channels = []
    if channels and _one_in(draw, 5):
        channels += channels[: draw(st.integers(1, len(channels)))]  # duplicates
    items = [QueryItem(b"channel=" + _encode(c), "channel", c) for c in channels]
    items += [
        QueryItem(_encode(k) + b"=" + _encode(v), k, v)
        for k, v in draw(st.lists(_EXTRAS, max_size=3))
    ]
    # Raw junk whose decoding is not predicted (one in eight requests).
    if _one_in(draw, 8):
        junk = _pick(*
            [b"%ZZ", b"&&", b"channel", b"=x", b"channel=%", b"channel=pub.a%2", b"channel=+pub.a",
             b";", b"channel=pub.a#frag", b"channel=%F0%9F%92%A9", b"channel=%ff", b"token=%00",
             b"channel=pub%2Ea", b"%63hannel=pub.a", b"channel=pub.a;x=y", b"channel=pub.a=b"]
        )  # fmt: skip
        items += [QueryItem(j) for j in draw(st.lists(junk, min_size=1, max_size=3))]
    if 1 < len(items) < 10 and draw(st.booleans()):
        items = [items[i] for i in draw(st.permutations(range(len(items))))]
    return tuple(items)


_QUERY = query_items()
_EXTRAS = st.one_of(
    tokens().map(lambda t: ("token", t.decode("latin-1"))),
    last_event_ids().map(lambda v: ("last_event_id", v.decode("latin-1"))),
    st.sampled_from(["", "123.456", "x" * 300, "é", "\x00"]).map(lambda v: ("socket_id", v)),
    st.tuples(
        st.sampled_from(["Channel", "channel[]", "channels", "a", "_", "retry", "x" * 100]),
        st.text(max_size=8),
    ),
)

_HOSTS = st.sampled_from(
    [b"127.0.0.1"] * 12 + [b"evil.example:80", b"\xffhost", b"", b"[::1]", b"a" * 300, b"x y"]
)
_SECOND_SINGLETONS = (
    (b"Host", b"evil.example"),
    (b"Host", b"127.0.0.1"),
    (b"User-Agent", b"Mozilla/5.0"),
    (b"Content-Type", b"text/plain"),
    (b"Content-Length", b"0"),
    (b"Transfer-Encoding", b"chunked"),
)
_FRAMING_FLAWS = st.sampled_from(
    [
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Content-Length", b"-1")],
        [(b"Content-Length", b"x")],
        [(b"Content-Length", b"1, 2")],
        [(b"Content-Length", b"1"), (b"Content-Length", b"2")],
    ]
)

# One deliberate flaw that aiohttp's parser must refuse, in about one request in four.
FLAWS = (
    "method",
    "version",
    "long_target",
    "long_header",
    "many_headers",
    "control_byte",
    "singleton",
    "framing",
    "target_byte",
    "header_name",
)


@st.composite
def hostile_requests(draw: st.DrawFn, targets: int = 2) -> Hostile:
    """One whole request; see the module docstring for what is drawn."""
    target = draw(st.integers(0, targets - 1))
    flaw = draw(_pick(*[None] * 30 + list(FLAWS) * 1))
    method = draw(_pick(*[b"GET"] * 24 + [b"OPTIONS"] * 2 + list(KNOWN_METHODS)))
    path, route = draw(_pick(*PATHS))
    if _one_in(draw, 30):  # a long path (that still parses)
        path, route = b"/" + b"a" * draw(st.integers(1, 8000)), None
    query = draw(_QUERY) if route != "healthz" or draw(st.booleans()) else ()
    version = draw(_pick(*[b"HTTP/1.1"] * 9 + [b"HTTP/1.0"]))
    headers: list[tuple[bytes, bytes]] = [(b"Host", draw(_HOSTS))]
    optional: list[tuple[bytes, int, st.SearchStrategy[bytes]]] = [
        (b"Accept", 6, _pick(*[b"text/event-stream", b"text/event-stream", b"*/*",
                                        b"TEXT/EVENT-STREAM", b"application/json",
                                        b"text/event-stream;q=0.1"])),
        (b"Last-Event-ID", 4, last_event_ids()),
        (b"Authorization", 4, authorizations()),
        (b"Cookie", 3, cookies()),
        (b"Origin", 4, origins()),
        (b"X-Forwarded-For", 4, forwarded_fors()),
        (b"Expect", 1, _pick(*[b"100-continue", b"100-CONTINUE", b"junk", b""])),
        (b"User-Agent", 3, _pick(*[b"Mozilla/5.0", b"", b"\x80\xff", b"u" * 8000])),
        (b"Content-Type", 1, _pick(*[b"text/plain", b"application/json", b"multipart/x"])),
    ]  # fmt: skip
    for name, weight, values in optional:  # weight: in how many of 10 requests it is there
        if draw(st.integers(0, 9)) >= 10 - weight:
            many = name.lower() not in SINGLETONS  # a second one: the "singleton" flaw
            count = draw(_pick(*[1] * 8 + [2, 3])) if many else 1  # sometimes more than once
            headers += [(name, draw(values)) for _ in range(count)]
    headers += draw(st.lists(filler_headers(), max_size=3))
    body = b""
    framing = draw(_pick(*["none"] * 16 + ["length", "chunked"]))
    if framing == "length":
        body = b"b" * draw(st.integers(0, 2000))
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked":
        body = b"5\r\nhello\r\n0\r\n\r\n"
        headers.append((b"Transfer-Encoding", b"chunked"))

    if flaw == "method":
        method = draw(_pick(*BAD_METHODS))
    elif flaw == "version":
        version = draw(_pick(*BAD_VERSIONS))
    elif flaw == "long_target":
        if draw(st.booleans()):
            path, route = b"/" + b"a" * draw(_OVERSIZES), None
        else:
            query += (QueryItem(b"x=" + b"q" * draw(_OVERSIZES), "x", ""),)
    elif flaw == "long_header":
        name = draw(_pick(*[b"X-Junk", b"Last-Event-ID", b"Authorization", b"Cookie"]))
        headers.append((name, b"1" * draw(_OVERSIZES)))
    elif flaw == "many_headers":
        headers += [(b"X-%d" % i, b"a") for i in range(draw(st.integers(128, 140)))]
    elif flaw == "control_byte":
        name, value = draw(_pick(*headers))
        bad = draw(_pick(*[b"\x00", b"\x01", b"\x1b", b"\x7f", b"\x0b", b"\rx"]))
        at = draw(st.integers(0, len(value)))
        headers.append((name, value[:at] + bad + value[at:]))
    elif flaw == "singleton":
        if draw(st.booleans()):
            headers.append(draw(_pick(*_SECOND_SINGLETONS)))
        else:
            headers = [h for h in headers if h[0] != b"Host"]
            version = b"HTTP/1.1"
    elif flaw == "framing":
        headers += draw(_FRAMING_FLAWS)
    elif flaw == "target_byte":
        byte = draw(_pick(*[b" ", b"\x00", b"\x7f", b"\xc3\xa9", b"\t", b"\xff"]))
        query += (QueryItem(b"x=a" + byte + b"b"),)
    elif flaw == "header_name":
        name = draw(_pick(*[b"X A", b"", b"X-\xc3\xa9", b"X(", b"X\t"]))
        headers.append((name, b"v"))
    if 1 < len(headers) < 12 and draw(st.booleans()):
        headers = [headers[i] for i in draw(st.permutations(range(len(headers))))]
    trailing = b"GARBAGE\x00\r\n\r\n" if _one_in(draw, 40) else b""
    return Hostile(
        target,
        method,
        path,
        route,
        query,
        version,
        tuple(headers),
        body,
        trailing,
    )


# -- the oracle ------------------------------------------------------------------------------------

# What the README documents for the public listener: the stream (200), a
# preflight (204: "preflights are answered"), the refusals of /events and
# /readyz. aiohttp adds its own: 400 for what its parser refuses, 404/405 from
# routing and 417 for an Expect it does not know. Anything else (a 500) fails.
README_STATUSES = frozenset({200, 204, 400, 401, 403, 429, 503})
AIOHTTP_STATUSES = frozenset({400, 404, 405, 417})
RETRYABLE = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class Expectation:
    kind: str  # "unparseable", "route", "preflight", "health", "events", "unpredicted"
    statuses: frozenset[int]
    channels: tuple[str, ...] = ()
    why: str = ""
    stream_on_retry: bool = False  # retryable refusals come as a 200 reconnect stream
    aiohttp_400: bool = False  # a text/plain 400 of aiohttp's parser is allowed too


def _cors_allowed(origin: str) -> bool:
    origin = origin.lower()
    wildcard = re.fullmatch(r"https://[a-z0-9-]+(?:\.[a-z0-9-]+)*\.example\.org", origin)
    return origin == "https://app.example.com" or wildcard is not None


def unparseable(req: Hostile, epoch: bytes) -> str | None:
    """Why aiohttp's parser must refuse the request (None: it parses)."""
    if req.method not in KNOWN_METHODS:
        return f"method {req.method!r}"
    if req.version not in GOOD_VERSIONS:
        return f"version {req.version!r}"
    target = req.request_target(epoch)
    if len(target) > MAX_LINE:
        return f"request target of {len(target)} bytes"
    if any(b < 0x21 or b > 0x7E for b in target):
        return "a byte outside ! .. ~ in the request target"
    headers = req.header_list(epoch)
    if len(headers) > MAX_HEADER_LINES:
        return f"{len(headers)} header lines"
    for i, (name, value) in enumerate(headers):
        # aiohttp 3.14 counts the name into the limit for the first header only.
        if len(value) + (len(name) if i == 0 else 0) > MAX_LINE or len(name) > MAX_LINE:
            return f"{name.decode(errors='replace')} line of {len(name) + len(value)} bytes"
        if _BAD_VALUE_BYTE.search(value):
            return f"a control byte in {name.decode()}"
        if not _TOKEN_NAME.fullmatch(name):
            return f"header name {name!r}"
    names = [n.lower() for n, _ in headers]
    if req.version == b"HTTP/1.1" and b"host" not in names:
        return "no Host header"
    if twice := [n for n in SINGLETONS if names.count(n) > 1]:
        return f"{twice[0].decode()} twice"
    lengths = [v for n, v in headers if n.lower() == b"content-length"]
    if lengths and (len(lengths) > 1 or not lengths[0].strip().isdigit()):
        return "a bad Content-Length"
    if lengths and b"transfer-encoding" in names:
        return "Content-Length with Transfer-Encoding"
    return None


def _first(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v.strip(b" \t")
    return None


def _header_text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def expectation(req: Hostile, epoch: bytes, auth: str = "jwt") -> Expectation:
    """What the broker (``auth.mode``) must answer to ``req``: README rules, nothing
    from broker code."""
    why = unparseable(req, epoch)
    if why is not None:
        return Expectation("unparseable", frozenset({400}), why=why)
    headers = req.header_list(epoch)
    expect = _first(headers, b"expect")
    aiohttp_400 = bool(req.trailing)  # the junk after it may be refused first
    if req.version == b"HTTP/1.1" and expect and expect.lower() != b"100-continue":
        return Expectation("route", frozenset({417}), why="Expect", aiohttp_400=aiohttp_400)
    if req.route is None:
        return Expectation("route", frozenset({404}), aiohttp_400=aiohttp_400)
    allowed = {"events": (b"GET", b"OPTIONS"), "healthz": (b"GET", b"HEAD")}
    if req.method not in allowed.get(req.route, (b"GET", b"HEAD")):
        return Expectation("route", frozenset({405}), aiohttp_400=aiohttp_400)
    if req.route == "healthz":
        return Expectation("health", frozenset({200}), aiohttp_400=aiohttp_400)
    if req.route == "readyz":
        return Expectation("health", frozenset({200, 503}), aiohttp_400=aiohttp_400)
    if req.method == b"OPTIONS":
        return Expectation("preflight", frozenset({204}), aiohttp_400=aiohttp_400)
    return _events_expectation(req, headers, epoch, aiohttp_400, auth)


def _events_expectation(
    req: Hostile,
    headers: list[tuple[bytes, bytes]],
    epoch: bytes,
    aiohttp_400: bool,
    auth: str,
) -> Expectation:
    accept = _first(headers, b"accept") or b""
    on_retry = b"text/event-stream" in accept
    every = frozenset({200, 400, 401, 403, 429, 503})
    if any(q.key is None for q in req.query):
        return Expectation("unpredicted", every, aiohttp_400=True, stream_on_retry=on_retry)
    ep = epoch.decode()
    pairs = [(q.key or "", (q.value or "").replace(EPOCH.decode(), ep)) for q in req.query]
    channels = tuple(dict.fromkeys(v for k, v in pairs if k == "channel"))
    bad = frozenset({400})
    if not channels:
        return Expectation("events", bad, why="no_channel", aiohttp_400=aiohttp_400)
    if len(channels) > MAX_CHANNELS:
        return Expectation("events", bad, channels, "too_many_channels", aiohttp_400=aiohttp_400)
    if not all(re.fullmatch(r"[A-Za-z0-9_\-.:@=#/]{1,200}", c) for c in channels):
        return Expectation("events", bad, channels, "bad_channel", aiohttp_400=aiohttp_400)
    public = all(
        fnmatch.fnmatchcase(c, PUBLIC) and not c.startswith(("private-", "presence-"))
        for c in channels
    )
    if auth == "callback":
        allowed, why = _callback_statuses(headers, public)
        return Expectation(
            "events", allowed, channels, why, stream_on_retry=on_retry, aiohttp_400=aiohttp_400
        )
    # Credentials, first present wins: Authorization: Bearer, ?token=, the sse_token cookie.
    token: bytes | None = None
    authorization = _first(headers, b"authorization")
    if authorization:
        scheme, _, value = _header_text(authorization).partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            token = value.strip().encode("utf-8", "surrogateescape")
    if token is None:
        query_token = next((v for k, v in pairs if k == "token"), "")
        if query_token:
            token = query_token.encode("latin-1")
    if token is not None:
        allowed = {200, 401, 403} if signed_by_us(token) else {401}
        why = "signed token" if signed_by_us(token) else "a token we did not sign"
    else:
        cookie = b"; ".join(v for n, v in headers if n.lower() == b"cookie")
        if b"sse_token" in cookie:
            candidates = re.findall(rb"[A-Za-z0-9_\-.=!+/%]+", cookie)
            signed = any(signed_by_us(c.partition(b"=")[2] or c) for c in candidates)
            signed = signed or any(signed_by_us(c) for c in candidates)
            allowed = {200, 401, 403} if signed else ({200, 401} if public else {401})
            why = "a cookie (parsing not predicted)"
        else:
            allowed = {200} if public else {401}
            why = "anonymous, public" if public else "anonymous, not public"
    if 200 in allowed:
        allowed |= RETRYABLE
    return Expectation(
        "events",
        frozenset(allowed),
        channels,
        why,
        stream_on_retry=on_retry,
        aiohttp_400=aiohttp_400,
    )


def _callback_statuses(
    headers: list[tuple[bytes, bytes]], public: bool
) -> tuple[frozenset[int], str]:
    """README, callback mode: ``Authorization`` or a ``credential_cookies`` cookie
    means a call to the app (down here: it fails closed, 503); without them, no
    call -- public channels only, 401 for the rest."""
    if _first(headers, b"authorization"):
        return frozenset({503}), "credentials for an app that is down"
    cookie = b"; ".join(v for n, v in headers if n.lower() == b"cookie")
    if b"laravel_session" in cookie:  # whether it parses is not predicted
        return frozenset({200, 401, 429, 503} if public else {401, 503}), "a session cookie"
    if public:
        return frozenset({200} | RETRYABLE), "anonymous, public"
    return frozenset({401}), "anonymous, not public"


# -- sending ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: str | None = None  # no (complete) answer: why
    seconds: float = 0.0

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").partition(";")[0].strip()


PREAMBLE_DONE = (b"\n: ok\n", b"event: broker.reconnect\n")


async def send(host: str, port: int, data: bytes, *, head: bool, timeout: float) -> Outcome:
    """Send ``data`` as is and read one response (event streams: up to the preamble)."""
    out = Outcome()
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            while True:
                raw_head = await reader.readuntil(b"\r\n\r\n")
                status_line, *lines = raw_head[:-4].decode("latin-1").split("\r\n")
                out.status = int(status_line.split(" ", 2)[1])
                out.headers = [
                    (n.strip().lower(), v.strip()) for n, _, v in (x.partition(":") for x in lines)
                ]
                if out.status >= 200:
                    break
            if head or out.status in (204, 304):
                return out
            if out.content_type == "text/event-stream":
                buf = b""
                while not any(mark in buf for mark in PREAMBLE_DONE):
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    buf += chunk
                out.body = buf
            elif (length := out.header("content-length")) is not None:
                out.body = await reader.readexactly(int(length))
            else:
                out.body = await reader.read()
    except TimeoutError:
        out.error = f"no complete answer within {timeout:.1f}s"
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:120]
    except (ValueError, IndexError) as exc:
        out.error = f"unreadable answer: {exc}"[:120]
    finally:
        out.seconds = time.monotonic() - started
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return out


def _is_error_json(out: Outcome) -> str | None:
    if out.content_type != "application/json":
        return f"content type {out.content_type!r}, expected application/json"
    try:
        doc = orjson.loads(out.body)
    except orjson.JSONDecodeError:
        return f"body is not JSON: {out.body[:200]!r}"
    if not (isinstance(doc, dict) and isinstance(doc.get("error"), str)):
        return f"no string 'error' in {doc!r:.200}"
    if not isinstance(doc.get("message"), str):
        return f"no string 'message' in {doc!r:.200}"
    return None


def check(req: Hostile, epoch: bytes, out: Outcome, auth: str = "jwt") -> list[str]:
    """Every way ``out`` breaks the rules for ``req`` (empty: it keeps them)."""
    exp = expectation(req, epoch, auth)
    if out.status is None:
        if exp.kind == "unparseable" and out.error and "Reset" in out.error:
            return []  # refused while our bytes were still arriving: a reset, not an answer
        return [f"no answer ({out.error}); expected {sorted(exp.statuses)} [{exp.kind} {exp.why}]"]
    status = out.status
    problems: list[str] = []
    aiohttp_refusal = status == 400 and out.content_type == "text/plain"
    if status not in README_STATUSES | AIOHTTP_STATUSES:
        return [
            f"status {status} is not documented (expected {sorted(exp.statuses)} "
            f"[{exp.kind}: {exp.why}]): {out.body[:300]!r}"
        ]
    if aiohttp_refusal and (exp.kind == "unparseable" or exp.aiohttp_400):
        return problems
    streamed_refusal = status == 200 and exp.stream_on_retry and exp.statuses & RETRYABLE
    if status in RETRYABLE and exp.stream_on_retry:
        problems.append(
            f"{status} to a request accepting text/event-stream (README: a 200 with "
            f"broker.reconnect); body {out.body[:200]!r}"
        )
        return problems
    if status not in exp.statuses and not streamed_refusal:
        problems.append(
            f"status {status}, expected {sorted(exp.statuses)} [{exp.kind}: {exp.why}]; "
            f"body {out.body[:200]!r}"
        )
        return problems
    if exp.kind == "route":
        if out.content_type != "text/plain":
            problems.append(f"{status} with content type {out.content_type!r}")
    elif status == 200 and exp.kind in ("events", "unpredicted"):
        if out.content_type != "text/event-stream":
            problems.append(f"200 with content type {out.content_type!r}")
        elif b"retry: " not in out.body or not any(m in out.body for m in PREAMBLE_DONE):
            problems.append(f"200 stream ended before its preamble: {out.body[:300]!r}")
        elif b"event: broker.reconnect" in out.body and not streamed_refusal:
            problems.append(f"a reconnect where no retryable refusal fits: {out.body[:300]!r}")
        elif b"event: broker.reconnect" not in out.body and 200 not in exp.statuses:
            problems.append(
                f"a stream where only a refusal fits ({sorted(exp.statuses)}, {exp.why}): "
                f"{out.body[:300]!r}"
            )
    elif exp.kind == "health" and status == 503:
        if out.content_type != "application/json" or out.header("retry-after") is None:
            problems.append(f"/readyz 503 without JSON or Retry-After: {out.headers}")
    elif exp.kind in ("events", "unpredicted"):
        problem = _is_error_json(out)
        if problem:
            problems.append(f"{status}: {problem}")
        elif status == 401 and out.header("www-authenticate") is None:
            problems.append("401 without WWW-Authenticate")
        elif status in RETRYABLE and not (out.header("retry-after") or "").isdigit():
            problems.append(f"{status} without a numeric Retry-After")
        elif status == 403 and exp.channels:
            message = orjson.loads(out.body)["message"]
            if not any(c in message for c in exp.channels):
                problems.append(f"403 names none of the requested channels: {message!r:.200}")
        elif (
            status == 400
            and exp.why in ("no_channel", "too_many_channels", "bad_channel")
            and orjson.loads(out.body)["error"] != exp.why
        ):
            problems.append(f"400 {out.body[:200]!r}, expected error {exp.why!r}")
    elif exp.kind == "health" and req.method == b"GET" and out.content_type != "application/json":
        problems.append(f"/healthz or /readyz answered {out.content_type!r}")
    # CORS: on every answer the app makes, exactly for an allowed (first) Origin.
    origin = _first(req.header_list(epoch), b"origin")
    allowed = origin is not None and _cors_allowed(_header_text(origin))
    acao = out.header("access-control-allow-origin")
    if allowed and acao is None:
        problems.append(f"no Access-Control-Allow-Origin for the allowed origin {origin!r}")
    if not allowed and acao is not None:
        problems.append(f"Access-Control-Allow-Origin {acao!r} for origin {origin!r}")
    return problems


# -- a batch, and the checks after it --------------------------------------------------------------


def reason(out: Outcome) -> str:
    """The answer in a word: its status and JSON ``error`` code (or who made it)."""
    if out.status is None:
        return "no answer"
    if out.content_type == "application/json":
        with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError):
            return f"{out.status} {orjson.loads(out.body).get('error') or 'json'}"
    if out.content_type == "text/event-stream":
        refused = b"event: broker.reconnect" in out.body
        return f"{out.status} {'reconnect' if refused else 'stream'}"
    return f"{out.status} {out.content_type or 'no body'}"


async def _get_metrics(target: Target) -> str:
    reader, writer = await asyncio.open_connection(target.host, target.admin_port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise AssertionError(f"{target.name} /metrics: {head[:100]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return body.decode()


def _dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[eol + 2 : eol + 2 + size]
        pos = eol + 4 + size


async def open_connections(target: Target) -> float:
    return metric_value(await _get_metrics(target), "sse_broker_connections") or 0.0


_ERROR_MARKS = (" ERROR ", " CRITICAL ", '"level":"error"', '"level":"critical"', "Logging error")


def log_problems(text: str) -> list[str]:
    """Tracebacks and ERROR lines in a chunk of broker log (text or JSON lines)."""
    return [line for line in text.splitlines() if is_traceback(line) or is_error(line)]


def is_traceback(line: str) -> bool:
    return line.startswith("Traceback") or '"exc":"Traceback' in line


def is_error(line: str) -> bool:
    return any(mark in line for mark in _ERROR_MARKS)


def exceptions(text: str) -> list[str]:
    """The exception line (``ValueError: ...``) of each traceback in a chunk of log."""
    found: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("{") and '"exc":' in line:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                found.append(orjson.loads(line)["exc"].strip().splitlines()[-1])
        elif line.startswith("Traceback"):
            rest = [x for x in lines[i + 1 :] if x and not x.startswith(" ")]
            found.append(rest[0] if rest else "?")
    return found


@dataclass
class BatchResult:
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)  # "400 bad_channel", "400 aiohttp"
    failures: list[str] = field(default_factory=list)
    tracebacks: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # per request, seconds
    slowest: list[tuple[float, str]] = field(default_factory=list)  # the batch's slowest three


async def run_batch(
    targets: Sequence[Target],
    batch: Sequence[Hostile],
    *,
    concurrency: int = 8,
    find_culprits: bool = True,
) -> BatchResult:
    """Send ``batch``, check every answer, then each broker's log and connection gauge.

    ``find_culprits``: when a broker logged a traceback, replay the batch's
    requests one by one to name those that cause it.
    """
    result = BatchResult()
    sem = asyncio.Semaphore(concurrency)

    async def one(req: Hostile) -> Outcome:
        t = targets[req.target]
        async with sem:
            return await send(
                t.host, t.port, req.wire(t.epoch), head=req.method == b"HEAD", timeout=5.0
            )

    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(r) for r in batch))
    result.seconds = time.monotonic() - started
    pairs = zip(outcomes, batch, strict=True)
    for out, req in sorted(pairs, key=lambda x: -x[0].seconds)[:3]:
        what = f"{reason(out)} {out.error or ''} from {targets[req.target].name}"
        result.slowest.append((out.seconds, f"{what}: {req.short(targets[req.target].epoch)}"))
    for i, (req, out) in enumerate(zip(batch, outcomes, strict=True)):
        t = targets[req.target]
        result.sent += 1
        result.latencies.append(out.seconds)
        result.reasons[reason(out)] += 1
        result.statuses[f"{t.name} {out.status if out.status is not None else 'none'}"] += 1
        for problem in check(req, t.epoch, out, t.auth):
            result.failures.append(
                f"#{i} to {t.name}: {problem}\n    request: {req.short(t.epoch)}"
            )
    for t in targets:
        try:
            await _eventually_zero(t)
        except TimeoutError as exc:
            result.failures.append(f"{t.name}: sse_broker_connections did not return to 0: {exc}")
    for t in targets:
        await log_fence(t)  # a traceback is logged right after its answer
    for t in targets:
        found = log_problems(t.log_since())
        tracebacks = sum(1 for line in found if is_traceback(line))
        result.tracebacks += tracebacks
        if found:
            first = next((line for line in found if is_error(line)), found[0])
            if first[:4].isdigit():
                first = first[24:]  # without the time stamp
            elif first.startswith("{"):  # a JSON log line
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError, KeyError):
                    doc = orjson.loads(first)
                    first = f"{doc['level'].upper()} {doc['logger']}: {doc['msg']}"
            result.failures.append(
                f"{t.name} logged {tracebacks} tracebacks, {len(found) - tracebacks} other ERROR "
                f"lines; the first: {first[:300]}"
            )
    if result.tracebacks and find_culprits:
        result.failures += await culprits(targets, batch)
    return result


async def _eventually_zero(target: Target) -> None:
    await eventually(lambda: open_connections(target), lambda n: n == 0, timeout=5.0)


async def log_fence(target: Target) -> None:
    """Wait until ``target`` logged what it was going to about the requests so far,
    without consuming its log (``log_since`` still returns all of it).

    The fence: one more public stream, opened and closed once no other stream is
    open. The broker writes its ``stream closed`` line as it unregisters it, after
    the hang-up reached its loop; a traceback that follows an answer is logged in
    the loop's steps right after that answer, long before this stream's request
    was even read. A sleep would only hope so."""

    def closes() -> int:
        with target.log_path.open("rb") as f:
            f.seek(target.log_offset)
            return f.read().count(b"stream closed")

    await _eventually_zero(target)  # any other stream's line is written: ours is the next
    before = closes()
    fence = _get(b"channel=pub.fence").wire(b"0")
    out = await send(target.host, target.port, fence, head=False, timeout=5)
    assert out.status == 200, (target.name, out)
    await eventually(lambda: asyncio.sleep(0, closes()), lambda n: n > before)


async def culprits(
    targets: Sequence[Target], batch: Sequence[Hostile], limit: int = 8
) -> list[str]:
    """Replay each request alone; name those after which a broker logged a traceback."""
    found: list[str] = []
    for req in batch:
        t = targets[req.target]
        out = await send(t.host, t.port, req.wire(t.epoch), head=req.method == b"HEAD", timeout=5)
        await log_fence(t)
        errors = exceptions(t.log_since())
        if errors:
            found.append(
                f"traceback reproduced alone on {t.name}: {errors[0]} "
                f"(answer {out.status})\n  request: {req.short(t.epoch)}"
            )
            if len(found) >= limit:
                break
    return found or ["a traceback was logged, but no request reproduces it alone"]


# -- the Hypothesis driver (also used by tests/bench/hostile.py) -----------------------------------


@dataclass
class FuzzStats:
    sent: int = 0
    batches: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    tracebacks: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0  # sending and reading only
    latencies: list[float] = field(default_factory=list)
    slowest: list[tuple[float, str]] = field(default_factory=list)
    culprit_searches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def fuzz(
    targets: Sequence[Target],
    *,
    batches: int,
    batch_size: int = 50,
    concurrency: int = 8,
    fail_fast: bool = True,
    on_batch: Callable[[BatchResult], None] | None = None,
) -> FuzzStats:
    """Run ``batches`` Hypothesis examples, each a batch of generated requests.

    Blocking (each batch runs in its own event loop): call it in a thread.
    ``fail_fast``: raise at the first batch that breaks a rule (with every
    broken rule of that batch in the message); otherwise collect and go on.
    """
    stats = FuzzStats()

    @settings(
        max_examples=batches,
        deadline=None,
        phases=(Phase.generate,),  # no shrinking: a failing batch names its requests itself
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )
    @given(batch=st.lists(hostile_requests(len(targets)), min_size=batch_size, max_size=batch_size))
    def one_batch(batch: list[Hostile]) -> None:
        # Replaying a batch request by request is slow: a few times per run is enough.
        search = stats.culprit_searches < 3
        result = asyncio.run(
            run_batch(targets, batch, concurrency=concurrency, find_culprits=search)
        )
        with stats.lock:
            stats.sent += result.sent
            stats.batches += 1
            stats.statuses.update(result.statuses)
            stats.reasons.update(result.reasons)
            stats.tracebacks += result.tracebacks
            stats.seconds += result.seconds
            stats.latencies += result.latencies
            stats.slowest = sorted(stats.slowest + result.slowest, reverse=True)[:5]
            stats.culprit_searches += bool(search and result.tracebacks)
            stats.failures += result.failures
        if on_batch is not None:
            on_batch(result)
        if fail_fast and result.failures:
            raise AssertionError(
                f"{len(result.failures)} broken rules in a batch of {result.sent}:\n"
                + "\n".join(result.failures[:40])
            )

    one_batch()
    return stats


# -- classic attacks: always sent, first (the warm-up) ---------------------------------------------

_H = ((b"Host", b"127.0.0.1"),)
_STREAM = (*_H, (b"Accept", b"text/event-stream"))


def _get(query: bytes, *headers: tuple[bytes, bytes], target: int = 0) -> Hostile:
    items = tuple(
        QueryItem(part, *(unquote_to_bytes(x).decode() for x in part.split(b"=", 1)))
        for part in query.split(b"&")
        if part
    )
    return Hostile(target, b"GET", b"/events", "events", items, b"HTTP/1.1", (*_STREAM, *headers))


def classics(targets: int) -> list[Hostile]:
    """Known attacks, each on every target."""
    exp = int(time.time()) + 3600
    good = sign({"alg": "HS256"}, {"exp": exp, "sub": "u1"}, SECRET.encode())
    # Valid, but with lone surrogates for ids: every log line must still be writable.
    odd = {"exp": exp, "sub": "\udcff", "tenant": "\ud800x", "channels": ["*"]}
    surrogates = sign({"alg": "HS256"}, odd, SECRET.encode())
    out: list[Hostile] = []
    for t in range(targets):
        out += [
            _get(b"channel=pub.a", (b"Last-Event-ID", EPOCH + b"-" + b"9" * 5000), target=t),
            _get(b"channel=pub.a", (b"Last-Event-ID", EPOCH + b"-" + b"0" * 4301), target=t),
            _get(b"channel=pub.a&last_event_id=" + EPOCH + b"-" + b"9" * 5000, target=t),
            _get(b"channel=pub.a", (b"Last-Event-ID", "١٢٣-٤".encode()), target=t),
            _get(b"channel=pub.a", (b"Last-Event-ID", b"\xff\xfe"), target=t),
            _get(b"channel=pub.a", (b"Last-Event-ID", b"1-" + b"1" * (MAX_LINE - 2)), target=t),
            _get(b"channel=priv.a", (b"Authorization", b"Bearer \xff\xfe"), target=t),
            _get(b"channel=priv.a", (b"Cookie", b"sse_token=\xff"), target=t),
            _get(b"channel=priv.a", (b"Authorization", b"Bearer " + good), target=t),
            _get(b"channel=priv.a", (b"Authorization", b"Bearer " + surrogates), target=t),
            _get(b"channel=priv.a&token=" + b"A" * 8000, target=t),
            _get(b"&".join(b"channel=pub.%d" % i for i in range(40)), target=t),
            _get(b"channel=pub." + b"x" * 196, target=t),
            _get(b"channel=pub.a", (b"Origin", b"https://\xe2\x84\xaa.example.org"), target=t),
            _get(b"channel=pub.a", (b"X-Forwarded-For", b", ".join([b"1.1.1.1"] * 500)), target=t),
            _get(b"channel=pub.a", (b"X-Junk", b"v" * MAX_LINE), target=t),
            _get(b"channel=pub.a", (b"X-Junk", b"v" * (MAX_LINE + 1)), target=t),
            _get(b"channel=pub.a", *((b"X-%d" % i, b"a") for i in range(130)), target=t),
            _get(b"channel=pub.a", (b"Cookie", b"sse_token=a"), (b"Cookie", b"c=d"), target=t),
            Hostile(t, b"OPTIONS", b"/events", "events", (), b"HTTP/1.1",
                    (*_H, (b"Origin", b"https://a.example.org"))),
            Hostile(t, b"HEAD", b"/events", "events", (), b"HTTP/1.1", _H),
            Hostile(t, b"POST", b"/events", "events", (), b"HTTP/1.1",
                    (*_H, (b"Content-Length", b"3")), b"abc"),
            Hostile(t, b"GET", b"/healthz", "healthz", (), b"HTTP/1.1", (*_H, (b"Expect", b"x"))),
            Hostile(t, b"PRI", b"*", None, (), b"HTTP/2.0", (), b"SM\r\n\r\n"),
            Hostile(t, b"GET", b"/events", "events", (QueryItem(b"channel=pub.a", "channel",
                    "pub.a"),), b"HTTP/1.1", _STREAM, trailing=b"GARBAGE\x00\r\n\r\n"),
        ]  # fmt: skip
    return out


# -- the test --------------------------------------------------------------------------------------


async def head_id(target: Target) -> bytes:
    """The ``id:`` a fresh public stream of ``target`` starts at."""
    req = _get(b"channel=pub.epoch")
    out = await send(target.host, target.port, req.wire(b"0"), head=False, timeout=5)
    assert out.status == 200, (target.name, out)
    match = re.search(rb"\nid: (p?\d+)-(\d+)\n", out.body)  # pubsub ids: p<epoch>-<seq>
    assert match is not None, (target.name, out.body)
    return match.group(1)


async def start_targets(start_broker: StartBroker, redis_url_client: Any) -> list[Target]:
    """The brokers of :data:`MODES`, with their epochs."""
    # A few entries so that stream ids are real times.
    for i in range(3):
        await redis_url_client.xadd(STREAM_KEY, {"channel": "pub.warm", "data": str(i)})
    targets = []
    for mode in MODES:
        broker = await start_broker(*broker_settings(mode))
        assert broker.url is not None and broker.admin_url is not None
        host, port = broker.url.removeprefix("http://").rsplit(":", 1)
        admin_port = int(broker.admin_url.rsplit(":", 1)[1])
        auth = "callback" if mode == "callback" else "jwt"
        targets.append(
            Target(mode, host, int(port), admin_port, broker.pid, broker.log_path, auth=auth)
        )
    for t in targets:
        t.epoch = await head_id(t)
        t.log_since()
    return targets


@pytest.mark.slow
async def test_hostile_requests_keep_every_documented_rule(
    start_broker: StartBroker, redis_client: Any
) -> None:
    targets = await start_targets(start_broker, redis_client)

    # Warm-up: the classic attacks, then three generated batches.
    warm = await run_batch(targets, classics(len(targets)))
    assert not warm.failures, "classic attacks:\n" + "\n".join(warm.failures)
    await asyncio.to_thread(fuzz, targets, batches=3)
    rss_before = {t.name: rss_kib(t.pid) for t in targets}

    stats = await asyncio.to_thread(fuzz, targets, batches=11)
    assert stats.sent >= 500, stats

    print(f"{stats.sent} generated requests after the warm-up; answers: {stats.reasons}")
    for t in targets:
        assert await open_connections(t) == 0
        growth = rss_kib(t.pid) - rss_before[t.name]
        print(f"{t.name} broker RSS {rss_before[t.name]} KiB after the warm-up, +{growth} KiB")
        assert growth <= 2048, (
            f"{t.name} broker RSS grew by {growth} KiB over {stats.sent} requests "
            f"({rss_before[t.name]} KiB after the warm-up)"
        )
    # Both kinds of answers really happened (the generator is not stuck on one).
    seen = {key.split()[1] for key in stats.statuses}
    assert {"200", "400", "401", "404"} <= seen, stats.statuses
