"""The record of one task and of a failed one: plain data, shared by the maps, the journal and the reports.

Below every layer that uses them (the journal stores ``TaskRecord`` fields, the
report reads them), so that none of those has to import the maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class TaskRecord:
    """One task: where and when it ran, how often, and how it ended."""

    index: int
    key: str | None = None
    engine_id: int | None = None
    host: str | None = None
    pid: int | None = None
    submitted: float | None = None  # epoch seconds, last attempt
    started: float | None = None
    finished: float | None = None
    attempts: int = 0  # attempts charged to the task (its own exceptions / walltime)
    resubmits: int = 0  # re-runs not charged: engine lost, straggler abort, drained
    crashes: int = 0  # engines that died while this task ran alone on them (see crash_limit)
    outcome: str | None = None  # final: ipmtc.outcomes OK | RAISED | WALLTIME | UNDONE
    error: str | None = None  # "Ename: message" of the last failure
    history: list = field(default_factory=list)  # earlier attempts: (engine_id, host, started, finished, outcome)
    slots: tuple = ()  # a wide command line's engines (its last attempt), the lead one first; () = engine_id's

    @property
    def duration_s(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


STORED_FIELDS = ("engine_id", "host", "pid", "started", "finished", "attempts", "outcome", "error")


def from_stored(rec: TaskRecord, stored: dict[str, Any]) -> None:
    """Fill ``rec`` with what a journal recorded of its task (a hit: it is not run again)."""
    for k in STORED_FIELDS:
        if k in stored:
            setattr(rec, k, stored[k])


@dataclass
class TaskFailure:
    """A task that exhausted its retries: the remote traceback, engine id and host."""

    index: int
    item: Any
    ename: str
    evalue: str
    traceback: str
    engine_id: int | None
    host: str | None
    attempts: int

    def __str__(self) -> str:
        return f"task {self.index} failed on engine {self.engine_id} ({self.host}) after " \
               f"{self.attempts} attempt(s): {self.ename}: {self.evalue}"


__all__ = ["TaskFailure", "TaskRecord"]
