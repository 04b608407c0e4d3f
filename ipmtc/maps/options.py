"""The driver-side settings of one map, resolved once by :mod:`.api`.

What the engines need (the function, walltime, ...) is in :class:`.spec.MapSpec`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..journal import Journal

Schedule = Literal["static", "dynamic"]


@dataclass(frozen=True)
class Options:
    """How the dispatcher places, retries, supervises and records the tasks of one map."""

    schedule: Schedule = "dynamic"
    retries: int = 0  # a task's own failures (exceptions, walltime kills) it may retry
    fast_abort: float | None = None  # abort a task running longer than this x the median; None: never
    chunksize: int | Literal["auto"] = "auto"
    ordered: bool = True
    progress: bool = True
    drain_at: float | None = None  # epoch: hand out no task that would end after this
    drain_margin_s: float = 30.0
    journal: Journal | None = None
    key: Callable[[Any], str] | None = None  # the journal's task key (None without a journal)
    crash_limit: int = 3  # engines a task may take down before it fails as EngineCrashes
    stream: bool = False  # imap: results go to the caller as they come, nothing of a finished task is kept
    pool: str | None = None  # a map over one pool of the whole cluster: that pool's engines may join mid-map

    @property
    def static(self) -> bool:
        return self.schedule == "static"
