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
    median_task_s: float | None  # of the tasks that ended ok

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _field(rec: Any, name: str) -> Any:
    return rec[name] if isinstance(rec, Mapping) else getattr(rec, name)


def task_stats(records: Iterable[Any]) -> TaskStats:
    """Count ``records`` by outcome, with retries, resubmits and the median ok task time."""
    tasks = ok = failed = undone = retries = resubmits = 0
    durations: list[float] = []
    for r in records:
        tasks += 1
        outcome = _field(r, "outcome")
        if outcome == OK:
            ok += 1
            started, finished = _field(r, "started"), _field(r, "finished")
            if started is not None and finished is not None:
                durations.append(finished - started)
        elif outcome in FAILED:
            failed += 1
        elif outcome not in FINAL:
            undone += 1
        retries += max(0, (_field(r, "attempts") or 0) - 1)
        resubmits += _field(r, "resubmits") or 0
    median = round(statistics.median(durations), 6) if durations else None
    return TaskStats(tasks, ok, failed, undone, retries, resubmits, median)


def efficiency(busy_s: float, capacity_s: float) -> float | None:
    """busy time / (engines x time they were held); None when nothing was held."""
    return busy_s / capacity_s if capacity_s > 0 else None
