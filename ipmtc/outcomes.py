"""How a task, or one attempt of it, ended: the one spelling of each outcome.

Final outcomes (``TaskRecord.outcome``, the journal's ``outcome`` column):
``OK``, ``RAISED``, ``WALLTIME``, ``MEMORY``, ``CRASHED``, ``UNDONE``. Attempt outcomes (``TaskRecord.history``
and the engine's per-task rows) add ``LOST`` (its engine died), ``STRAGGLER``
(aborted by ``fast_abort``), ``ABORTED`` and ``NOTRUN`` (the engine's words for a
task interrupted by SIGINT and for the rest of its chunk). The values are plain
strings because they are stored in journals and JSON reports.
"""
from __future__ import annotations

from typing import Final

OK: Final = "ok"
RAISED: Final = "raised"  # the task's function raised (retries spent)
WALLTIME: Final = "walltime"  # killed at its walltime (retries spent)
MEMORY: Final = "memory"  # killed past its max_rss_mb (retries spent)
CRASHED: Final = "crashed"  # took down its engine crash_limit times (EngineCrashes)
UNDONE: Final = "undone"  # never handed out: allocation ending, engines gone
LOST: Final = "lost"  # its engine died under it (no retry spent)
STRAGGLER: Final = "straggler"  # aborted by fast_abort and rerun elsewhere (no retry spent)
ABORTED: Final = "aborted"  # engine side: interrupted by SIGINT
NOTRUN: Final = "notrun"  # engine side: not reached in its chunk
LEFT: Final = "left"  # queued on an engine that `ipmtc remove` drained: handed out again (no retry spent)

FAILED: Final = (RAISED, WALLTIME, MEMORY, CRASHED)  # final outcomes that count as failures
FINAL: Final = (OK, *FAILED)  # outcomes a journal records
CHARGED: Final = (RAISED, WALLTIME, MEMORY)  # attempt outcomes that spend one of the task's retries
