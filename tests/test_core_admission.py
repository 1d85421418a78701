"""Connection limits in process (broker/admission.py): reserve, refuse, release.

A reservation *is* the limit check, so the counts here are exact: each limit
admits exactly its bound and refuses the next request with a retryable error
naming the limit; a slot is released once however often its holder releases
it; history scans are capped separately and end before the stream does.
"""

from __future__ import annotations

import pytest

from broker.admission import Admission, Slot
from broker.config import LimitsConfig
from broker.errors import Retryable

UNLIMITED = 0  # a limit of 0 does not bind


def limits(total: int = UNLIMITED, tenant: int = UNLIMITED, ip: int = UNLIMITED) -> LimitsConfig:
    return LimitsConfig(
        max_connections=total, max_connections_per_tenant=tenant, max_connections_per_ip=ip
    )


def refusal(admission: Admission, tenant: str | None, ip: str, *, scan: bool = False) -> Retryable:
    with pytest.raises(Retryable) as info:
        admission.reserve(tenant, ip, scan=scan)
    return info.value


def counts(admission: Admission) -> tuple[int, dict[str, int], dict[str, int], int]:
    return (
        admission.total,
        dict(admission.per_tenant),
        dict(admission.per_ip),
        admission.scans,
    )


# Requests are (tenant, ip). Each row fills a limit to its bound, then asks once more.
REQUESTS_A = [("t1", "10.0.0.1"), ("t1", "10.0.0.2"), ("t2", "10.0.0.1")]


@pytest.mark.parametrize(
    ("config", "admitted", "refused", "limit", "others"),
    [
        pytest.param(
            limits(total=3),
            REQUESTS_A,
            ("t3", "10.0.0.9"),
            "limits.max_connections",
            [],
            id="total",
        ),
        pytest.param(
            limits(tenant=2),
            [("t1", "10.0.0.1"), ("t1", "10.0.0.2")],
            ("t1", "10.0.0.3"),
            "limits.max_connections_per_tenant",
            [("t2", "10.0.0.3"), (None, "10.0.0.3"), ("", "10.0.0.3")],
            id="per tenant: other tenants and no tenant still pass",
        ),
        pytest.param(
            limits(ip=2),
            [("t1", "10.0.0.1"), ("t2", "10.0.0.1")],
            ("t3", "10.0.0.1"),
            "limits.max_connections_per_ip",
            [("t1", "10.0.0.2"), ("t1", "::1")],
            id="per ip: other addresses still pass",
        ),
        pytest.param(
            limits(tenant=1),
            [(None, "10.0.0.1")] * 5,
            None,
            None,
            [],
            id="per tenant never counts requests without a tenant",
        ),
        pytest.param(
            limits(ip=1),
            [("t1", "")] * 5,
            None,
            None,
            [],
            id="per ip never counts an unknown address",
        ),
        pytest.param(limits(), [("t1", "10.0.0.1")] * 50, None, None, [], id="0 = unlimited"),
        pytest.param(
            limits(total=2, ip=2),
            [("t1", "10.0.0.1"), ("t1", "10.0.0.1")],
            ("t1", "10.0.0.1"),
            "limits.max_connections",
            [],
            id="total is named first when several limits are reached",
        ),
        pytest.param(
            limits(tenant=2, ip=2),
            [("t1", "10.0.0.1"), ("t1", "10.0.0.1")],
            ("t1", "10.0.0.1"),
            "limits.max_connections_per_tenant",
            [("t2", "10.0.0.2")],
            id="tenant before ip",
        ),
        pytest.param(
            limits(total=1),
            [("t1", "10.0.0.1")],
            (None, ""),
            "limits.max_connections",
            [],
            id="total counts anonymous requests too",
        ),
    ],
)
def test_each_limit_admits_its_bound_and_refuses_the_next_with_its_name(
    config: LimitsConfig,
    admitted: list[tuple[str | None, str]],
    refused: tuple[str | None, str] | None,
    limit: str | None,
    others: list[tuple[str | None, str]],
) -> None:
    admission = Admission(config, max_scans=1)
    slots = [admission.reserve(tenant, ip) for tenant, ip in admitted]
    assert admission.total == len(admitted)
    if refused is not None:
        before = counts(admission)
        for _ in range(3):  # a refusal reserves nothing, however often it repeats
            exc = refusal(admission, *refused)
            assert exc.message == f"{limit} reached"
            assert (exc.code, exc.status, exc.reason) == ("too_many_connections", 429, "limit")
        assert counts(admission) == before
    for tenant, ip in others:
        slots.append(admission.reserve(tenant, ip))
    # Releasing one slot that counted against the limit (the first admitted one
    # in every row) admits exactly one more, then the limit refuses again.
    if refused is not None:
        admission.release(slots.pop(0))
        slots.append(admission.reserve(*refused))
        assert refusal(admission, *refused).message == f"{limit} reached"
    for slot in slots:
        admission.release(slot)
    assert counts(admission) == (0, {}, {}, 0), "every count back to zero, no empty keys left"


def test_counts_follow_each_reservation_exactly() -> None:
    admission = Admission(limits(), max_scans=10)
    a = admission.reserve("t1", "1.1.1.1")
    b = admission.reserve("t1", "2.2.2.2", scan=True)
    c = admission.reserve(None, "1.1.1.1")
    d = admission.reserve("t2", "")
    assert counts(admission) == (4, {"t1": 2, "t2": 1}, {"1.1.1.1": 2, "2.2.2.2": 1}, 1)
    admission.release(b)
    assert counts(admission) == (3, {"t1": 1, "t2": 1}, {"1.1.1.1": 2}, 0)
    admission.release(c)
    admission.release(d)
    assert counts(admission) == (1, {"t1": 1}, {"1.1.1.1": 1}, 0)
    admission.release(a)
    assert counts(admission) == (0, {}, {}, 0)


@pytest.mark.parametrize("releases", [2, 3, 10])
def test_a_slot_is_released_once_however_often_its_holder_releases_it(releases: int) -> None:
    admission = Admission(limits(total=2, tenant=2, ip=2), max_scans=1)
    keep = admission.reserve("t", "1.1.1.1")
    slot = admission.reserve("t", "1.1.1.1", scan=True)
    for _ in range(releases):
        admission.release(slot)
        admission.scanned(slot)
    assert slot.released and not slot.scanning
    assert counts(admission) == (1, {"t": 1}, {"1.1.1.1": 1}, 0)
    # the other holder's share is intact: one more fits, the next does not
    again = admission.reserve("t", "1.1.1.1", scan=True)
    refusal(admission, "t", "1.1.1.1")
    for slot in (keep, again):
        admission.release(slot)
    assert counts(admission) == (0, {}, {}, 0)


# -- history scans -----------------------------------------------------------------------


@pytest.mark.parametrize("max_scans", [2, 3, 5])
def test_scans_are_capped_at_max_concurrent_scans(max_scans: int) -> None:
    admission = Admission(limits(total=100), max_scans=max_scans)
    scanning = [admission.reserve("t", f"10.0.0.{i}", scan=True) for i in range(max_scans)]
    assert admission.scans == max_scans
    exc = refusal(admission, "t", "10.0.0.99", scan=True)
    assert (exc.code, exc.status, exc.reason) == ("resume_busy", 503, "limit")
    assert f"replay.max_concurrent_scans = {max_scans}" in exc.message
    assert admission.total == max_scans, "a refused scan holds no connection slot"
    plain = admission.reserve("t", "10.0.0.99")  # a stream that needs no scan is admitted
    assert not plain.scanning
    # a scan that ends frees its place while its stream goes on
    admission.scanned(scanning[0])
    admission.scanned(scanning[0])
    assert (admission.scans, admission.total) == (max_scans - 1, max_scans + 1)
    late = admission.reserve("t", "10.0.0.100", scan=True)
    refusal(admission, "t", "10.0.0.101", scan=True)
    # releasing a still-scanning slot frees its scan; releasing a finished one does not again
    admission.release(scanning[-1])
    admission.release(scanning[0])
    assert admission.scans == max_scans - 1
    for slot in (*scanning[1:-1], plain, late):
        admission.release(slot)
    assert counts(admission) == (0, {}, {}, 0)


def test_scanned_on_a_slot_that_never_scanned_changes_nothing() -> None:
    admission = Admission(limits(), max_scans=1)
    busy = admission.reserve("t", "1.1.1.1", scan=True)
    plain = admission.reserve("t", "1.1.1.2")
    admission.scanned(plain)
    assert admission.scans == 1
    refusal(admission, "t", "1.1.1.3", scan=True)
    admission.release(busy)
    admission.release(plain)
    assert counts(admission) == (0, {}, {}, 0)


@pytest.mark.parametrize(
    ("config", "code", "status"),
    [
        # The scan cap is checked first: a client resuming into a full broker is told
        # resume_busy (503), not too_many_connections (429).
        (limits(total=1), "resume_busy", 503),
        (limits(ip=1), "resume_busy", 503),
    ],
)
def test_scan_cap_is_checked_before_the_connection_limits(
    config: LimitsConfig, code: str, status: int
) -> None:
    admission = Admission(config, max_scans=1)
    admission.reserve("t", "1.1.1.1", scan=True)
    exc = refusal(admission, "t", "1.1.1.1", scan=True)
    assert (exc.code, exc.status) == (code, status)
    exc = refusal(admission, "t", "1.1.1.1")
    assert (exc.code, exc.status) == ("too_many_connections", 429)
    assert (admission.total, admission.scans) == (1, 1)


def test_a_scan_refused_by_a_connection_limit_holds_no_scan() -> None:
    admission = Admission(limits(total=1), max_scans=2)
    admission.reserve("t", "1.1.1.1")
    exc = refusal(admission, "t", "1.1.1.2", scan=True)
    assert exc.code == "too_many_connections"
    assert admission.scans == 0


# -- reload ------------------------------------------------------------------------------


def test_new_limits_apply_to_the_counts_already_held() -> None:
    admission = Admission(limits(ip=5), max_scans=2)
    slots = [admission.reserve("t", "1.1.1.1") for _ in range(4)]
    admission.limits = limits(ip=2)  # a reload lowers the bound below the open streams
    refusal(admission, "t", "1.1.1.1")
    for slot in slots[:2]:
        admission.release(slot)
    refusal(admission, "t", "1.1.1.1")  # 2 held, bound 2: still full
    admission.release(slots[2])
    slots.append(admission.reserve("t", "1.1.1.1"))
    refusal(admission, "t", "1.1.1.1")
    admission.max_scans = 0  # the reloaded scan cap applies at once too
    refusal(admission, "t", "1.1.1.2", scan=True)
    for slot in slots[3:]:
        admission.release(slot)
    assert counts(admission) == (0, {}, {}, 0)


def test_slot_remembers_what_it_counted() -> None:
    slot = Admission(limits(), max_scans=1).reserve("t", "1.1.1.1", scan=True)
    assert isinstance(slot, Slot)
    assert (slot.tenant, slot.ip, slot.scanning, slot.released) == ("t", "1.1.1.1", True, False)
