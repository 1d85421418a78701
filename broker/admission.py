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

from broker.config import LimitsConfig
from broker.errors import Retryable


class Slot:
    """One admitted (or being admitted) stream's share of the limits."""

    __slots__ = ("ip", "released", "tenant")

    def __init__(self, tenant: str | None, ip: str) -> None:
        self.tenant = tenant
        self.ip = ip
        self.released = False


class Admission:
    """Counts reserved slots globally, per tenant and per client address (per process)."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits  # replaced on reload; counts carry over
        self.total = 0
        self.per_tenant: Counter[str] = Counter()
        self.per_ip: Counter[str] = Counter()

    def reserve(self, tenant: str | None, ip: str) -> Slot:
        """A slot, or the retryable 429 naming the limit that is reached."""
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
        return Slot(tenant, ip)

    def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self.total -= 1
        for counter, key in ((self.per_tenant, slot.tenant), (self.per_ip, slot.ip)):
            if key:
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]
