"""The names of the scenarios and the sizes, rates and time caps they run with.

``--quick`` picks the small set; ``--param NAME=VALUE`` overrides one field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SERVERS = ("broker", "naive")
COMPARED = ("idle", "fanout", "ingest")  # broker against the naive baseline
LIFECYCLE = ("soak", "drain", "stalled")  # the broker alone
EXTRA = ("workers",)  # the broker alone, server.workers = 1 against 2
HOSTILE = ("hostile",)  # the broker alone, generated hostile requests; only with --only
# Bridge mode (ingest.mode = "bridge"): its cost against stream mode, and a fleet
# of three whose leader is SIGKILLed; only with --only (handover alone is ~4 min).
BRIDGE = ("bridge", "handover")
BROKER_ONLY = LIFECYCLE + EXTRA + HOSTILE + BRIDGE
SCENARIOS = COMPARED + LIFECYCLE + EXTRA + HOSTILE + BRIDGE
DEFAULT = COMPARED + LIFECYCLE + EXTRA  # workers adds ~40 s full, ~25 s quick


@dataclass(frozen=True)
class Settings:
    idle_conns: int
    fanout_subs: int
    fanout_rate: float
    fanout_seconds: float
    drain_seconds: float
    flood_count: int
    cap_seconds: float  # idle + fanout + ingest, both servers
    # soak: resuming streams through recycles
    soak_conns: int
    soak_cap: float
    # drain: SIGTERM with open streams
    drain_conns: int
    drain_cap: float
    # stalled: fast subscribers beside clients that never read
    stalled_seconds: float
    stalled_cap: float
    # workers: the fan-out against server.workers = 1, then 2
    workers_subs: int
    workers_seconds: float
    workers_cap: float
    workers_rate: float = 50
    soak_age_seconds: int = 10  # sse.max_connection_age_seconds
    soak_generations: int = 5
    # Events/s on the channel meanwhile: 20k deliveries/s in both sizes (the
    # quick 1,000 x 20/s). 5,000 x 20/s = 100k deliveries/s saturates two
    # shared cores by itself (README, "soak").
    soak_rate: float = 4
    soak_retry_ms: int = 500  # sse.retry_ms: the jittered wait before each reconnect
    drain_window_seconds: int = 5  # shutdown.drain_seconds
    stalled_fast: int = 200
    stalled_slow: int = 100
    stalled_rate: float = 50
    stalled_event_bytes: int = 8192
    connect_concurrency: int = 500  # in flight per client process
    # hostile: generated requests (tests/test_hostile_requests.py), after the classic attacks
    hostile_requests: int = 10_000
    hostile_cap: float = 300
    # bridge: the same fan-out by a broker in stream mode, then in bridge mode
    bridge_subs: int = 1000  # over bridge_channels channels, one client process each
    bridge_channels: int = 4
    bridge_rate: float = 50.0  # events/s on each channel
    bridge_seconds: float = 20.0
    bridge_cap: float = 150.0
    # handover: 3 bridge-mode brokers on a fresh redis per run, the leader SIGKILLed
    handover_runs: int = 10
    handover_brokers: int = 3
    handover_clients: int = 16
    handover_channels: int = 64  # each client subscribes to channels / clients of them
    handover_rate: float = 1000.0  # events/s over all channels
    handover_seconds: float = 12.0
    handover_kill_after: float = 5.0  # seconds into publishing
    handover_cap: float = 420.0
    settle_seconds: float = 2.0

    def cap_for(self, scenarios: Sequence[str], brokers: int = 1) -> float:
        """The hard time cap of a run of ``scenarios``, with ``brokers`` broker
        checkouts under test (2 with ``--compare-with``)."""
        caps = {
            "soak": self.soak_cap,
            "drain": self.drain_cap,
            "stalled": self.stalled_cap,
            "workers": self.workers_cap,
            "hostile": self.hostile_cap,
            "bridge": self.bridge_cap,
            "handover": self.handover_cap,
        }
        # cap_seconds covers two servers (the broker and the naive baseline).
        compared = self.cap_seconds if any(x in COMPARED for x in scenarios) else 0.0
        compared *= (1 + brokers) / 2
        return compared + brokers * sum(caps.get(x, 0.0) for x in scenarios)

    def max_connections(self) -> int:
        """``limits.max_connections`` for every server: the largest scenario, plus slack."""
        return 1000 + max(
            self.idle_conns,
            self.fanout_subs,
            self.soak_conns,
            self.drain_conns,
            self.stalled_fast + self.stalled_slow,
            self.workers_subs,
            self.bridge_subs,
        )

    @classmethod
    def pick(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                idle_conns=1000,
                fanout_subs=300,
                fanout_rate=50,
                fanout_seconds=5,
                drain_seconds=8,
                flood_count=200_000,
                cap_seconds=90,
                soak_conns=1000,
                soak_rate=20,
                soak_cap=120,
                drain_conns=1000,
                drain_cap=60,
                stalled_seconds=8,
                stalled_cap=90,
                workers_subs=1000,
                workers_seconds=8,
                workers_cap=90,
                hostile_requests=2_000,
                hostile_cap=120,
                bridge_subs=300,
                bridge_seconds=8.0,
                bridge_cap=90.0,
                handover_runs=3,
                handover_cap=150.0,
            )
        return cls(
            idle_conns=5000,
            fanout_subs=1000,
            fanout_rate=50,
            fanout_seconds=20,
            drain_seconds=20,
            flood_count=1_000_000,
            cap_seconds=360,
            soak_conns=5000,
            soak_cap=180,
            drain_conns=5000,
            drain_cap=90,
            stalled_seconds=20,
            stalled_cap=150,
            workers_subs=2000,
            workers_seconds=15,
            workers_cap=150,
        )
