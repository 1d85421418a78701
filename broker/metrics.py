"""Every metric of the broker, defined once.

Hot-path counters are plain ints on :class:`Stats` (an increment there costs a
few nanoseconds; a prometheus-client ``Counter.inc`` takes a lock) and are
turned into metric families only when Prometheus scrapes. No metric carries
tenant, user or channel labels: their cardinality is unbounded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "sse_broker_"


class Stats:
    """Mutable counters the broker updates as it runs (one instance per process)."""

    __slots__ = (
        "auth_calls",
        "auth_failures",
        "bridge_appended",
        "bridge_holes",
        "bridge_renewals",
        "bridge_takeovers",
        "bytes_sent",
        "connections_closed",
        "connections_opened",
        "events_delivered",
        "events_ingested",
        "events_rejected",
        "events_replayed",
        "redis_reconnects",
        "replays_served",
        "requests_refused",
        "resets",
        "retained_refused",
        "slow_consumers",
    )

    def __init__(self) -> None:
        self.events_ingested = 0
        self.events_delivered = 0
        self.bytes_sent = 0
        self.connections_opened = 0
        self.events_rejected: Counter[str] = Counter()
        self.connections_closed: Counter[str] = Counter()
        self.requests_refused: Counter[str] = Counter()
        self.redis_reconnects = 0
        self.replays_served = 0
        self.events_replayed = 0
        self.resets: Counter[str] = Counter()
        self.retained_refused = 0
        self.auth_failures: Counter[str] = Counter()
        self.auth_calls: Counter[str] = Counter()
        self.slow_consumers = 0
        self.bridge_appended = 0
        self.bridge_holes = 0
        self.bridge_renewals = 0
        self.bridge_takeovers = 0


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, gauges: Callable[[], dict[str, float]]) -> None:
        self._stats = stats
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        yield _counter("events_ingested", "Events accepted from Redis.", s.events_ingested)
        yield _counter(
            "events_delivered", "Event frames queued to connections.", s.events_delivered
        )
        yield _counter("bytes_sent", "Bytes written to SSE connections.", s.bytes_sent)
        yield _counter("connections_opened", "SSE streams opened.", s.connections_opened)
        yield _labelled(
            "events_rejected", "Inbound messages rejected.", "reason", s.events_rejected
        )
        yield _labelled(
            "connections_closed", "SSE streams closed, by reason.", "reason", s.connections_closed
        )
        yield _labelled(
            "requests_refused", "Stream requests refused, by reason.", "reason", s.requests_refused
        )
        yield _counter("redis_reconnects", "Ingest reconnections to Redis.", s.redis_reconnects)
        yield _counter(
            "slow_consumer_closes",
            "Streams closed because their unsent bytes passed limits.write_buffer_bytes.",
            s.slow_consumers,
        )
        yield _counter("replays_served", "Resumes served exactly from history.", s.replays_served)
        yield _counter("events_replayed", "Events sent by exact resumes.", s.events_replayed)
        yield _labelled("resets", "broker.reset events sent, by reason.", "reason", s.resets)
        yield _counter(
            "retained_refused",
            "Retained keys refused or dropped at replay.max_retained_keys/bytes.",
            s.retained_refused,
        )
        yield _labelled(
            "auth_failures",
            "Stream requests refused by auth, by reason.",
            "reason",
            s.auth_failures,
        )
        yield _labelled(
            "auth_backend_calls",
            "Auth backend (callback/laravel) calls, by result.",
            "result",
            s.auth_calls,
        )
        yield _counter(
            "bridge_appended",
            "Bridge mode: pub/sub messages this process appended to the stream.",
            s.bridge_appended,
        )
        yield _counter(
            "bridge_holes",
            "Bridge mode: hole markers this process wrote (events it could not append).",
            s.bridge_holes,
        )
        yield _counter(
            "bridge_lease_renewals",
            "Bridge mode: lease renewals by this process.",
            s.bridge_renewals,
        )
        yield _counter(
            "bridge_takeovers", "Bridge mode: leases taken by this process.", s.bridge_takeovers
        )
        for name, value in self._gauges().items():
            g = GaugeMetricFamily(PREFIX + name, _GAUGE_HELP.get(name, name))
            g.add_metric([], value)
            yield g


_GAUGE_HELP = {
    "connections": "Open SSE streams.",
    "subscriptions": "Channel subscriptions of open streams.",
    "redis_connected": "1 while the ingest is connected and subscribed to Redis.",
    "ingest_stalled": "1 while the ingest is connected but not receiving its canary.",
    "history_events": "Events held in the replay history.",
    "history_bytes": "Bytes accounted to the replay history (frames plus overhead).",
    "retained_keys": "Retained-state keys held.",
    "admission_slots": "Streams holding a slot in the connection limits (open or being admitted).",
    "deadline_entries": "Entries in the per-stream deadline heaps (expiry, recycling, re-checks).",
    "pending_connections": "Connections not yet admitted as streams, counted per address.",
    "catch_up_waiters": "Stream-mode resumes waiting for this reader to reach their position.",
    "bridge_leader": "Bridge mode: 1 while this process holds the lease and appends.",
    "bridge_lag_seconds": "Bridge mode: how long the oldest message not yet appended has waited.",
}


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _labelled(name: str, doc: str, label: str, values: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class Metrics:
    """The registry one process exposes on ``/metrics``."""

    def __init__(self, stats: Stats, gauges: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.stats = stats
        self.registry.register(_StatsCollector(stats, gauges))
        self.publish_latency = Histogram(
            PREFIX + "publish_to_write_seconds",
            "Time from publish (stream mode: the stream id's time; pubsub mode: when the "
            "broker read it) to the write of the first event of each batch.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )

        self.auth_latency = Histogram(
            PREFIX + "auth_backend_seconds",
            "Latency of calls to the auth backend (callback/laravel).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
