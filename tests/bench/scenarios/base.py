"""What a scenario module hands to ``run.py``: one :class:`Scenario`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from report import Figure, Metric, figures_of
from settings import Settings
from targets import Context

Result = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Scenario:
    """A scenario: how it runs against one server kind and how its result is reported.

    ``metrics`` are the rows of the broker / naive table (compared scenarios);
    ``report`` prints a broker-only scenario's own table; ``figures`` are what
    ``--compare-with`` sets side by side (default: ``metrics``); ``problems``
    are the ERROR lines a result calls for beyond a failed run.
    """

    name: str
    run: Callable[[Context, str], Result]
    metrics: Sequence[Metric] = ()
    report: Callable[[Result, Settings], None] | None = None
    figures: Callable[[Result, Settings], list[Figure]] | None = None
    problems: Callable[[Result], list[str]] | None = None

    def figures_of(self, result: Result, settings: Settings) -> list[Figure]:
        if self.figures is not None:
            return self.figures(result, settings)
        return figures_of(result, self.metrics)
