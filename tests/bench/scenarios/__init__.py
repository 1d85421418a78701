"""The scenarios, one module each, and :data:`REGISTRY` (name -> :class:`Scenario`).

``idle``, ``fanout`` and ``ingest`` run against the broker and the naive
baseline; the others run the broker alone and print their own tables
(``hostile`` lives in ``tests/bench/hostile.py``; ``bridge`` and ``handover``
are bridge mode's, run only when named in ``--only``).
"""

from __future__ import annotations

import hostile
from settings import SCENARIOS

from scenarios import bridge, drain, fanout, handover, idle, ingest, soak, stalled, workers
from scenarios.base import Scenario

REGISTRY: dict[str, Scenario] = {
    m.SCENARIO.name: m.SCENARIO
    for m in (idle, fanout, ingest, soak, drain, stalled, workers, hostile, bridge, handover)
}
assert tuple(REGISTRY) == SCENARIOS, "settings.SCENARIOS and the registry disagree"
