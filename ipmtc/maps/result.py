"""What a map hands back: results in order or as completed, failures, per-task records."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import report
from ..outcomes import LOST, OK, RAISED, UNDONE, WALLTIME  # noqa: F401 (imported from here by older code)
from ..records import TaskFailure, TaskRecord
from ..stats import efficiency, task_stats


class MapResult:
    """Results of a map. Iterating gives results in input order (``ordered=True``) or as they completed.

    A failed task's slot holds its :class:`TaskFailure` (check ``res.failed``).
    """

    def __init__(self, *, ordered: bool = True, n_engines: int = 0, schedule: str = ""):
        self.ordered = ordered
        self.schedule = schedule
        self.n_engines = n_engines
        self._values: dict[int, Any] = {}
        self._completion: list[int] = []
        self.records: list[TaskRecord] = []
        self.failed: list[TaskFailure] = []
        self.undone: list[int] = []  # indices left undone (allocation ending, engines lost)
        self.engine_losses = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.journal_hits = 0  # results taken from a journal instead of running

    # filled by the dispatcher
    def _set(self, index: int, value: Any) -> None:
        self._values[index] = value
        self._completion.append(index)

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        order = sorted(self._values) if self.ordered else self._completion
        for i in order:
            yield self._values[i]

    def __getitem__(self, index: int) -> Any:
        return self._values[index]

    def get(self) -> list[Any]:
        """All results as a list (in the iteration order)."""
        return list(self)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.undone

    def summary(self) -> dict[str, Any]:
        """Tasks, failures, retries, engine losses, makespan, efficiency."""
        recs = self.records
        # a failed attempt is in the history; a task's own times are its successful attempt
        busy = sum(r.duration_s or 0.0 for r in recs if r.outcome == OK) + sum(
            (h[3] - h[2]) for r in recs for h in r.history if h[2] and h[3])
        makespan = (self.finished_at or 0) - (self.started_at or 0) if self.started_at else 0.0
        st = task_stats(recs)
        eff = efficiency(busy, self.n_engines * makespan)
        return {
            "schedule": self.schedule,
            "tasks": st.tasks,
            "ok": st.ok,
            "failed": st.failed,
            "undone": st.undone,
            "retries": st.retries,
            "resubmits": st.resubmits,
            "from_journal": self.journal_hits,
            "crashes": st.crashes,
            "engine_losses": self.engine_losses,
            "engines": self.n_engines,
            "makespan_s": round(makespan, 3),
            "busy_s": round(busy, 3),
            "median_task_s": st.median_task_s,
            "efficiency": round(eff, 4) if eff is not None else None,
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (f"<MapResult {s['schedule']}: {s['ok']}/{s['tasks']} ok, {s['failed']} failed, "
                f"{s['retries']} retries, {s['engine_losses']} engine losses, makespan {s['makespan_s']} s>")

    def plot_timeline(self, path: str | Path | None = None, **kwargs):
        """Timeline (Gantt chart) of the map, one row per engine; a matplotlib Figure (PNG at ``path``)."""
        return report.plot_timeline(self, path, **kwargs)

    def _repr_html_(self) -> str:  # notebooks: summary table and timeline
        return report.html_fragment(self)

    def save(self, path: str | Path) -> Path:
        """Write the records and summary as JSON (``ipmtc report`` reads it)."""
        path = Path(path)
        data = {"summary": self.summary(), "started_at": self.started_at, "finished_at": self.finished_at,
                "n_engines": self.n_engines, "records": [asdict(r) for r in self.records]}
        path.write_text(json.dumps(data, default=str))
        return path
