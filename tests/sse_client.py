"""The tests' oracle: a Server-Sent Events client that reads streams as a browser does.

``SSEParser`` is sans-I/O (bytes in, events out) and follows the WHATWG "event
stream interpretation" rules to the letter:
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

``SSEClient.connect`` wraps it around an aiohttp GET. The stream is *pulled*: bytes
are read off the socket only while a test awaits something (``next_event``,
``wait_comment``, ...). So a test that stops awaiting is a client that stops
reading, and the broker sees its socket back up (slow-consumer tests rely on it).
Nothing read is ever lost: dispatched events wait in a queue until taken.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

# Alternation order matters: "\r\n" must win over a lone "\r".
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event, as a browser's ``MessageEvent`` would see it.

    ``last_event_id`` is the stream's last event ID at dispatch time: the event's
    own ``id:`` if it had one, else the one inherited from earlier blocks.
    """

    data: str
    type: str = "message"
    last_event_id: str = ""

    def json(self) -> Any:
        """The data parsed as JSON (``broker.reset`` / ``broker.reconnect`` payloads)."""
        return orjson.loads(self.data)


class SSEParser:
    """Incremental WHATWG event-stream parser.

    ``feed(bytes)`` returns the events completed by those bytes; chunk boundaries
    may fall anywhere (inside a UTF-8 character, between CR and LF).

    Public state, readable at any time:

    - ``last_event_id``: the stream's last event ID *string*, which the spec
      updates at each blank line (dispatched or not), exactly what a browser
      would send as ``Last-Event-ID`` on reconnect. ``last_event_id_buffer`` is
      the value set by ``id:`` lines of the block still being read.
    - ``retry``: the last valid ``retry:`` value (ms), or ``None``.
    - ``comments``: every comment line, in order, without the leading ``:`` and
      without one following space (``": ping"`` -> ``"ping"``, ``":"`` -> ``""``).
    - ``id_only_updates``: blank-line-terminated blocks that dispatched nothing
      but changed ``last_event_id`` (the broker's ``id: <head>`` heartbeats).
    - ``dispatched``: number of events dispatched so far.
    """

    def __init__(self) -> None:
        # "utf-8-sig" strips exactly one BOM, only at the start of the stream, and
        # (like the spec's UTF-8 decode) replaces invalid sequences with U+FFFD.
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._partial: list[str] = []  # the current line, not yet terminated
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF is its pair
        self._data: list[str] = []
        self._event_type = ""
        self._id_buffer = ""
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments: list[str] = []
        self.id_only_updates = 0
        self.dispatched = 0
        self.closed = False

    @property
    def last_event_id_buffer(self) -> str:
        return self._id_buffer

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Parse more bytes; return the events they complete, in order."""
        if self.closed:
            raise RuntimeError("SSEParser.feed() after close()")
        return self._feed_text(self._decoder.decode(data))

    def close(self) -> None:
        """End of stream. Per spec, a block not closed by a blank line is discarded."""
        self._decoder.decode(b"", final=True)
        self._partial.clear()
        self._data.clear()
        self._event_type = ""
        self.closed = True

    def _feed_text(self, text: str) -> list[SSEEvent]:
        if not text:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        out: list[SSEEvent] = []
        pos = 0
        for match in _LINE_END.finditer(text):
            line = text[pos : match.start()]
            if self._partial:
                self._partial.append(line)
                line = "".join(self._partial)
                self._partial.clear()
            self._process_line(line, out)
            pos = match.end()
        if pos < len(text):
            self._partial.append(text[pos:])
        # A CR ending this chunk already ended a line; an LF opening the next is its pair.
        self._skip_lf = text.endswith("\r")
        return out

    def _process_line(self, line: str, out: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(out)
            return
        if line[0] == ":":
            comment = line[1:]
            self.comments.append(comment[1:] if comment.startswith(" ") else comment)
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\x00" not in value:
                self._id_buffer = value
        # isascii() first: str.isdigit() also accepts e.g. "²" and Arabic-Indic digits.
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        # Any other field name is ignored.

    def _dispatch(self, out: list[SSEEvent]) -> None:
        changed = self._id_buffer != self.last_event_id
        self.last_event_id = self._id_buffer
        if not self._data:
            self._event_type = ""
            if changed:
                self.id_only_updates += 1
            return
        # The spec appends LF after each data line and strips the final one.
        out.append(
            SSEEvent(
                data="\n".join(self._data),
                type=self._event_type or "message",
                last_event_id=self.last_event_id,
            )
        )
        self.dispatched += 1
        self._data = []
        self._event_type = ""


class SSEStreamClosed(EOFError):
    """The stream ended (server closed it, or the connection broke) before the awaited item."""


class SSEStatusError(AssertionError):
    """An event-stream method was used on a response whose status is not 200."""


class SSEStream:
    """One open response. Created by ``SSEClient.connect``; see the module docstring."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status: int = response.status
        self.headers: CIMultiDictProxy[str] = response.headers
        self.parser = SSEParser()
        self._raw = bytearray()
        self._events: deque[SSEEvent] = deque()
        self._comment_cursor = 0
        self.closed = False  # the server ended the stream or the connection broke
        self.close_error: BaseException | None = None  # None: a clean end of body

    # -- non-200 answers -------------------------------------------------------

    async def text(self) -> str:
        return await self.response.text()

    async def json(self, *, content_type: str | None = "application/json") -> Any:
        return await self.response.json(content_type=content_type, loads=orjson.loads)

    # -- what has been received ------------------------------------------------

    @property
    def raw(self) -> bytes:
        """Every body byte received so far, exactly as sent (after HTTP de-chunking)."""
        return bytes(self._raw)

    @property
    def pending(self) -> list[SSEEvent]:
        """Events received and dispatched but not yet taken by ``next_event``/``events``."""
        return list(self._events)

    # -- reading ---------------------------------------------------------------

    async def read_some(self) -> bytes:
        """Read one chunk off the wire into the parser; ``b""`` once the stream is over."""
        if self.closed:
            return b""
        if self.status != 200:
            body = await self.response.text()
            raise SSEStatusError(f"expected a 200 event stream, got {self.status}: {body[:500]!r}")
        try:
            chunk = await self.response.content.readany()
        except (aiohttp.ClientError, ConnectionError) as exc:
            self._end(exc)
            return b""
        if not chunk:
            self._end(None)
            return b""
        self._raw += chunk
        self._events.extend(self.parser.feed(chunk))
        return chunk

    def _end(self, error: BaseException | None) -> None:
        self.closed = True
        self.close_error = error
        self.parser.close()

    async def _read_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    if self.closed:
                        raise SSEStreamClosed(f"stream ended before {what}; {self._describe()}")
                    await self.read_some()
        except TimeoutError:
            raise TimeoutError(f"no {what} within {timeout}s; {self._describe()}") from None

    def _describe(self) -> str:
        how = "open" if not self.closed else f"closed ({self.close_error!r})"
        return (
            f"stream {how}, pending events {list(self._events)!r}, "
            f"last bytes {bytes(self._raw[-300:])!r}"
        )

    async def next_event(self, timeout: float = 5.0) -> SSEEvent:
        """The next event. Raises ``TimeoutError`` (nothing consumed) or ``SSEStreamClosed``."""
        await self._read_until(lambda: bool(self._events), timeout, "event")
        return self._events.popleft()

    async def events(self, n: int, timeout: float = 5.0) -> list[SSEEvent]:
        """The next ``n`` events, all within ``timeout`` in total.

        On timeout or end of stream nothing is consumed: events that did arrive
        stay queued (and are listed in the error message).
        """
        await self._read_until(lambda: len(self._events) >= n, timeout, f"{n} events")
        return [self._events.popleft() for _ in range(n)]

    async def wait_comment(self, timeout: float = 5.0) -> str:
        """The next comment not yet returned by this method (see ``SSEParser.comments``)."""
        await self._read_until(
            lambda: self._comment_cursor < len(self.parser.comments), timeout, "comment"
        )
        comment = self.parser.comments[self._comment_cursor]
        self._comment_cursor += 1
        return comment

    async def wait_for(
        self, predicate: Callable[[SSEStream], bool], timeout: float = 5.0, what: str = ""
    ) -> None:
        """Read until ``predicate(self)`` holds, e.g. ``lambda s: s.parser.retry is not None``."""
        await self._read_until(lambda: predicate(self), timeout, what or "predicate to hold")

    async def wait_closed(self, timeout: float = 5.0) -> bool:
        """Read to the end: True once the server closed the stream, False on timeout.

        Events read on the way are kept in ``pending`` (and ``next_event`` still
        returns them).
        """
        try:
            async with asyncio.timeout(timeout):
                while not self.closed:
                    await self.read_some()
        except TimeoutError:
            return False
        return True

    def disconnect(self) -> None:
        """Drop the connection from the client side (a tab closing)."""
        self.response.close()


class SSEClient:
    """Entry point: ``async with SSEClient.connect(url) as stream: ...``."""

    @staticmethod
    def connect(
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 10.0,
        last_event_id: str | None = None,
    ) -> contextlib.AbstractAsyncContextManager[SSEStream]:
        """GET ``url`` with ``Accept: text/event-stream`` and yield the response as a stream.

        ``timeout`` bounds the wait for the response headers only; reads are bounded
        per call. ``headers`` override the defaults (case-insensitively);
        ``last_event_id`` sets the ``Last-Event-ID`` header. Without ``session`` a
        private one is created and closed on exit. The connection is closed on exit.
        """
        return _connect(url, headers, params, session, timeout, last_event_id)


@contextlib.asynccontextmanager
async def _connect(
    url: str,
    headers: Mapping[str, str] | None,
    params: Mapping[str, str] | Sequence[tuple[str, str]] | None,
    session: aiohttp.ClientSession | None,
    timeout: float,
    last_event_id: str | None,
) -> AsyncIterator[SSEStream]:
    request_headers: CIMultiDict[str] = CIMultiDict({"Accept": "text/event-stream"})
    if last_event_id is not None:
        request_headers["Last-Event-ID"] = last_event_id
    for name, value in (headers or {}).items():
        request_headers[name] = value
    own_session = session is None
    client = aiohttp.ClientSession() if session is None else session
    try:
        async with asyncio.timeout(timeout):
            response = await client.get(
                url,
                headers=request_headers,
                params=params,
                # A stream has no total duration; only connecting is bounded here.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=None),
            )
        try:
            yield SSEStream(response)
        finally:
            response.close()
    finally:
        if own_session:
            await client.close()
