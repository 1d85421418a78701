"""Where a client stands: event ids and the positions they name.

An event id is what a client holds (``Last-Event-ID``); a position is what
the broker compares. Each ingest mode has its id scheme:

- pub/sub: ``p<epoch>-<seq>``, one sequence per process, valid only in the
  process that minted it (the epoch is its start time in ms);
- stream and bridge: a Redis stream id ``<ms>-<seq>``, the same on every
  instance.

The ``p`` keeps the two apart: without it a pub/sub id would parse as a stream
id (both are two numbers), and a client holding one after an operator switched
modes would "resume" from a position that never existed. Each scheme reads
only its own kind and answers ``unknown_id`` (an honest reset) for the other.

A position answers "how far is this client, on this channel": today every
channel of a position shares one sequence (:class:`Scalar`); a position made
of several streams' ids (one per partition) compares each channel against its
own partition's id (:class:`Vector`). History and resume ask only
:meth:`Position.at`, so both kinds pass through them unchanged.

Pure: no I/O and no broker imports beyond :mod:`broker.ids`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from broker.ids import split_event_id

MAX_SEQ = (1 << 64) - 1

Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry (id, fields) as redis-py returns it

# A stream entry with this field is no event: it marks events lost just before
# it (a bridge handover that could not be made whole). Readers reset across it.
HOLE = b"hole"


class Position(Protocol):
    def at(self, channel: str) -> int:
        """This position's sequence on ``channel`` (comparable with event sequences there)."""
        ...


class Scalar:
    """One sequence for every channel (one pub/sub process, or one stream)."""

    __slots__ = ("seq",)

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def at(self, channel: str) -> int:
        return self.seq

    def __repr__(self) -> str:
        return f"Scalar({self.seq})"


class Vector:
    """One sequence per partition (a stream each); a channel lives in one partition."""

    __slots__ = ("_partition_of", "seqs")

    def __init__(self, seqs: Mapping[str, int], partition_of: Callable[[str], str]) -> None:
        self.seqs = dict(seqs)
        self._partition_of = partition_of

    def at(self, channel: str) -> int:
        # A partition the client never heard of: it saw nothing of it yet.
        return self.seqs.get(self._partition_of(channel), 0)


def stream_seq(id: str) -> int | None:
    """A stream id as one order-preserving int (``ms << 64 | seq``); None when malformed."""
    parts = split_event_id(id)
    if parts is None:
        return None
    return (parts[0] << 64) | parts[1]


def split_stream_ms(id: str) -> int:
    """The millisecond part of a stream id Redis made (its time)."""
    parts = split_event_id(id)
    assert parts is not None, id
    return parts[0]


def previous_id(id: str) -> str:
    """The greatest possible stream id before ``id`` (a valid resume position);
    ``id`` is one Redis made."""
    parts = split_event_id(id)
    assert parts is not None, id
    ms, seq = parts
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{MAX_SEQ}" if ms else "0-0"


class Scheme(Protocol):
    """How one ingest mode's event ids map to positions."""

    def parse(self, last_id: str) -> int | str:
        """The sequence ``last_id`` names, or why it names none here (a reset reason)."""
        ...


class SequenceIds:
    """Pub/sub ids: ``p<epoch>-<seq>``, meaningful only to the process of that epoch."""

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.prefix = f"p{epoch}-"  # an id is this and the sequence

    def format(self, seq: int) -> str:
        return f"{self.prefix}{seq}"

    def parse(self, last_id: str) -> int | str:
        parts = split_event_id(last_id[1:]) if last_id.startswith("p") else None
        if parts is None:
            return "unknown_id"
        if str(parts[0]) != self.epoch:
            return "epoch"
        return parts[1]


class StreamIds:
    """Stream ids, the same on every instance reading the stream."""

    def parse(self, last_id: str) -> int | str:
        seq = stream_seq(last_id)
        return "unknown_id" if seq is None else seq
