"""The one place task statistics are computed.

``MapResult.summary()``, ``ipmtc report`` and ``ipmtc run``'s final table all
count tasks with :func:`task_stats`, so a task counts the same way in each.
Records are ``TaskRecord`` objects (a map in memory) or dicts with the same
field names (a saved map, a journal).
"""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .outcomes import FAILED, FINAL, OK


@dataclass(frozen=True)
class TaskStats:
    """Counts over a map's task records."""

    tasks: int
    ok: int
    failed: int  # final outcome raised or walltime
    undone: int  # no final outcome: never handed out, or left when the map stopped
    retries: int  # attempts charged beyond the first
    resubmits: int  # re-runs not charged (engine lost, straggler aborted)
    crashes: int  # engines that died under a task running alone on them
    median_task_s: float | None  # of the tasks that ended ok

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _field(rec: Any, name: str, default: Any = None) -> Any:
    return rec.get(name, default) if isinstance(rec, Mapping) else getattr(rec, name, default)


class Tally:
    """Running counts over task records, added one at a time (a stream keeps no records)."""

    MEDIAN_SAMPLE = 10_000  # the median ok task time is taken over the first this many

    def __init__(self) -> None:
        self.tasks = self.ok = self.failed = self.undone = self.retries = self.resubmits = self.crashes = 0
        self.busy_s = 0.0  # the ok tasks' own times
        self._durations: list[float] = []

    def add(self, r: Any) -> None:
        self.tasks += 1
        outcome = _field(r, "outcome")
        if outcome == OK:
            self.ok += 1
            started, finished = _field(r, "started"), _field(r, "finished")
            if started is not None and finished is not None:
                self.busy_s += finished - started
                if len(self._durations) < self.MEDIAN_SAMPLE:
                    self._durations.append(finished - started)
        elif outcome in FAILED:
            self.failed += 1
        elif outcome not in FINAL:
            self.undone += 1
        self.retries += max(0, (_field(r, "attempts") or 0) - 1)
        self.resubmits += _field(r, "resubmits") or 0
        self.crashes += _field(r, "crashes", 0) or 0

    def stats(self) -> TaskStats:
        median = round(statistics.median(self._durations), 6) if self._durations else None
        return TaskStats(self.tasks, self.ok, self.failed, self.undone, self.retries, self.resubmits,
                         self.crashes, median)


def task_stats(records: Iterable[Any]) -> TaskStats:
    """Count ``records`` by outcome, with retries, resubmits, crashes and the median ok task time."""
    tally = Tally()
    tally.MEDIAN_SAMPLE = 1 << 62  # every task's time
    for r in records:
        tally.add(r)
    return tally.stats()


def efficiency(busy_s: float, capacity_s: float) -> float | None:
    """busy time / (engines x time they were held); None when nothing was held."""
    return busy_s / capacity_s if capacity_s > 0 else None
