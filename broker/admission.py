"""Connection limits: a slot is reserved when the limits are checked, and
released in exactly one place.

A stream request awaits several times between its limit check and its
registration (auth, the response headers, a stream-mode catch-up, the
backlog). Counting only registered streams let concurrent requests all pass
the same check; here the check *is* the reservation, so 50 concurrent
requests against a limit of 2 admit exactly 2. The HTTP handler holds the
:class:`Slot` and releases it in its one ``finally``; a second release is a
no-op, so no exit path can release twice or not at all.
"""

from __future__ import annotations

from collections import Counter

from broker.config import Config, LimitsConfig
from broker.errors import Retryable


class Slot:
    """One admitted (or being admitted) stream's share of the limits."""

    __slots__ = ("ip", "released", "scanning", "tenant")

    def __init__(self, tenant: str | None, ip: str, scanning: bool) -> None:
        self.tenant = tenant
        self.ip = ip
        self.released = False
        self.scanning = scanning  # holds one of the concurrent history scans


class Admission:
    """Counts reserved slots globally, per tenant and per client address (per process)."""

    def __init__(self, limits: LimitsConfig, max_scans: int) -> None:
        self.limits = limits  # replaced on reload; counts carry over
        self.max_scans = max_scans
        self.scans = 0
        self.total = 0
        self.per_tenant: Counter[str] = Counter()
        self.per_ip: Counter[str] = Counter()

    def configure(self, cfg: Config) -> None:
        self.limits = cfg.limits
        self.max_scans = cfg.replay.max_concurrent_scans

    def reserve(self, tenant: str | None, ip: str, *, scan: bool = False) -> Slot:
        """A slot, or the retryable refusal naming the limit that is reached.

        ``scan``: the stream's resume reads history from Redis; at most
        ``max_scans`` do at once (beyond: 503 ``resume_busy``), so clients
        resuming from long ago cannot pile scans onto Redis.
        """
        if scan and self.scans >= self.max_scans:
            raise Retryable(
                f"replay.max_concurrent_scans = {self.max_scans} resumes are reading history",
                code="resume_busy",
                status=503,
                reason="limit",
            )
        limits = self.limits
        hit = None
        if 0 < limits.max_connections <= self.total:
            hit = "limits.max_connections"
        elif tenant and 0 < limits.max_connections_per_tenant <= self.per_tenant[tenant]:
            hit = "limits.max_connections_per_tenant"
        elif ip and 0 < limits.max_connections_per_ip <= self.per_ip[ip]:
            hit = "limits.max_connections_per_ip"
        if hit is not None:
            raise Retryable(
                f"{hit} reached", code="too_many_connections", status=429, reason="limit"
            )
        self.total += 1
        if tenant:
            self.per_tenant[tenant] += 1
        if ip:
            self.per_ip[ip] += 1
        if scan:
            self.scans += 1
        return Slot(tenant, ip, scan)

    def scanned(self, slot: Slot) -> None:
        """The slot's history scan is over (the stream itself goes on)."""
        if slot.scanning:
            slot.scanning = False
            self.scans -= 1

    def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self.scanned(slot)
        self.total -= 1
        for counter, key in ((self.per_tenant, slot.tenant), (self.per_ip, slot.ip)):
            if key:
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]
