"""The book of one map's tasks: what is left to hand out, what each attempt cost, how each task ended.

The ledger draws inputs from the source (skipping those a journal already holds),
keeps each task's :class:`~.result.TaskRecord`, and settles a chunk's
:class:`~.transport.Completion` task by task: an ok result goes to the
:class:`~.result.MapResult` (and the journal); a task's own failure (an exception,
a walltime kill) spends one of its retries, and a retry avoids the engine it
failed on; a task whose engine was lost, whose straggler copy was aborted, or that
its chunk did not reach is put back in line without spending any (a resubmit).
Only the ledger writes the result and the journal.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..outcomes import ABORTED, LOST, OK, RAISED, STRAGGLER, UNDONE, WALLTIME
from .options import Options
from .progress import Progress
from .result import MapResult, TaskFailure, TaskRecord

if TYPE_CHECKING:
    from .transport import Completion

Error = dict[str, str]  # ename, evalue, traceback


class TaskTimes:
    """Durations of the tasks finished so far: their running mean and recent median."""

    def __init__(self) -> None:
        self.durations: deque[float] = deque(maxlen=2000)
        self.mean: float | None = None

    def learn(self, duration: float) -> None:
        self.durations.append(duration)
        self.mean = duration if self.mean is None else 0.9 * self.mean + 0.1 * duration

    def median(self) -> float:
        return statistics.median(self.durations) if self.durations else 0.0

    def __len__(self) -> int:
        return len(self.durations)


class Ledger:
    """Every task's state, from its input to its outcome in the :class:`MapResult`."""

    def __init__(self, source: Iterator[tuple[int, Any]], n_total: int | None, opts: Options,
                 n_engines: int, bar: Progress):
        self.source, self.n_total, self.opts, self.bar = source, n_total, opts, bar
        self.journal = opts.journal
        # look tasks up (and key them before they run) only in a journal that holds some
        self.lookups = self.journal is not None and opts.key is not None and self.journal.has_records
        self.source_done = False
        self.n_taken = 0  # inputs drawn from the source so far
        self.items: dict[int, Any] = {}  # inputs of tasks not finished yet (needed to resubmit)
        self.records: dict[int, TaskRecord] = {}
        self.redo: deque[int] = deque()  # tasks to hand out again, before new ones
        self.avoid: dict[int, set[int]] = {}  # task -> engines it failed on (or straggled on)
        self.finished: set[int] = set()
        self.speculated: set[int] = set()  # stragglers whose second copy was sent
        self.n_retried = 0
        self.times = TaskTimes()
        self.res = MapResult(ordered=opts.ordered, n_engines=n_engines, schedule=opts.schedule)

    # ------------------------------------------------------------ what is left

    def has_work(self) -> bool:
        """Tasks not handed out yet (in line again, or not drawn from the source)."""
        return bool(self.redo) or not self.source_done

    def pending(self) -> int | None:
        """How many tasks are still to hand out (None while the total is unknown)."""
        return None if self.n_total is None else self.n_total - self.n_taken + len(self.redo)

    def remaining(self) -> int | None:
        """How many tasks have not finished (None while the total is unknown)."""
        return None if self.n_total is None else self.n_total - len(self.finished)

    # ------------------------------------------------------------ handing out

    def take(self, n: int, target: int, engines: list[int]) -> list[int]:
        """Up to ``n`` tasks for ``target``: those in line first, then new inputs (journal hits settled here)."""
        out: list[int] = []
        passed: list[int] = []
        while self.redo and len(out) < n:
            i = self.redo.popleft()
            avoid = self.avoid.get(i)
            # a retry runs elsewhere than where it failed, while another live engine exists
            if avoid and target in avoid and any(e not in avoid for e in engines):
                passed.append(i)
            else:
                out.append(i)
        self.redo.extendleft(reversed(passed))
        while not self.source_done and len(out) < n:
            try:
                index, item = next(self.source)
            except StopIteration:
                self.source_done = True
                break
            self.n_taken += 1
            self.items[index] = item
            rec = self.records[index] = TaskRecord(index=index)
            if self.lookups:  # keys for recording only are worked out by the journal's writer
                assert self.journal is not None and self.opts.key is not None
                rec.key = self.opts.key(item)
                hit = self.journal.lookup(rec.key)
                if hit is not None:
                    self._from_journal(index, rec, hit)
                    continue
            out.append(index)
        return out

    def _from_journal(self, index: int, rec: TaskRecord, hit: tuple[Any, dict[str, Any]]) -> None:
        value, stored = hit
        for k in ("engine_id", "host", "pid", "started", "finished", "attempts", "outcome", "error"):
            if k in stored:
                setattr(rec, k, stored[k])
        self.finished.add(index)
        self.res.journal_hits += 1
        if rec.outcome == OK:
            self.items.pop(index, None)
            self.res._set(index, value)
            self.bar.tick()
        else:
            ename, _, evalue = (rec.error or "Error: ").partition(": ")
            self._fail(index, rec, {"ename": ename, "evalue": evalue, "traceback": ""}, record=False)

    def tasks(self, indices: list[int]) -> list[tuple[int, Any]]:
        return [(i, self.items[i]) for i in indices]

    def sent(self, indices: list[int], when: float) -> None:
        for i in indices:
            self.records[i].submitted = when

    def back_in_line(self, indices: list[int]) -> None:
        """Tasks that were not sent after all: first in line again (nothing charged, nothing recorded)."""
        self.redo.extendleft(reversed(indices))

    def cannot_send(self, indices: list[int], exc: BaseException) -> None:
        """Inputs that cannot be sent fail at once: no retry can help."""
        now = time.time()
        err = {"ename": type(exc).__name__, "evalue": f"task input cannot be sent to the engines: {exc}",
               "traceback": ""}
        for i in indices:
            rec = self.records[i]
            rec.attempts, rec.outcome, rec.error = 1, RAISED, f"{err['ename']}: {err['evalue']}"
            rec.history.append((None, None, now, now, RAISED))
            self._fail(i, rec, err)

    # ------------------------------------------------------------ settling a chunk

    def settle(self, indices: list[int], done: Completion) -> None:
        """Book a chunk's answer, task by task."""
        eid = done.engine_id
        if done.lost:
            self.requeue(indices, eid, LOST)
        elif done.error is not None:
            now = time.time()
            for i in indices:
                self._charge(i, done.error, eid, None, None, now, now, RAISED)
        else:
            self._answered(done)

    def _answered(self, done: Completion) -> None:
        eid, node, pid = done.engine_id, done.node, done.pid
        skip: list[int] = []  # journal entries not to record (a duplicate that lost the race)
        over: dict[int, tuple[int, int]] = {}  # (attempts, resubmits) where not (1, 0)
        for _, index, started, finished, value in done.entries:
            if index in self.finished:
                skip.append(index)
                continue
            rec = self._ok(index, value, eid, node, pid, started, finished)
            if rec.attempts != 1 or rec.resubmits:
                over[index] = (rec.attempts, rec.resubmits)
        for index, status, payload, started, finished in done.rows:
            if index in self.finished:
                continue  # a speculative duplicate lost the race: discard it
            if status == OK:
                item = self.items.get(index)
                rec = self._ok(index, payload, eid, node, pid, started, finished)
                if self.journal is not None:
                    self.journal.add(rec, payload, item, self.opts.key)
            elif status in (RAISED, WALLTIME):
                self._charge(index, payload, eid, node, pid, started, finished, status)
            elif not (status == ABORTED and index in self.speculated):  # else its duplicate runs elsewhere
                self.requeue([index], eid, status)  # aborted straggler / not run: back in line, uncharged
        if done.entries and self.journal is not None:
            self.journal.add_chunk(done.journal_blob or b"", len(done.entries) - len(skip), eid, node, pid,
                                   skip, over)

    def _ok(self, index: int, value: Any, eid: int | None, node: str, pid: int, started: float,
            finished: float) -> TaskRecord:
        rec = self.records[index]
        rec.engine_id, rec.host, rec.pid = eid, node, pid
        rec.started, rec.finished = started, finished
        rec.attempts += 1
        rec.outcome, rec.error = OK, None
        self.finished.add(index)
        self.items.pop(index, None)
        self.res._set(index, value)
        self.times.learn(finished - started)
        self.bar.tick()
        return rec

    def _charge(self, index: int, err: Error, eid: int | None, node: str | None, pid: int | None,
                started: float, finished: float, outcome: str) -> None:
        """A task's own failure: spend one of its retries, or fail it for good."""
        rec = self.records[index]
        rec.attempts += 1
        rec.history.append((eid, node, started, finished, outcome))
        rec.engine_id, rec.host, rec.pid, rec.started, rec.finished = eid, node, pid, started, finished
        rec.error = f"{err.get('ename')}: {err.get('evalue')}"
        if rec.attempts <= self.opts.retries:
            self.n_retried += 1
            if eid is not None:
                self.avoid.setdefault(index, set()).add(eid)
            self.redo.append(index)
            return
        rec.outcome = outcome
        self._fail(index, rec, err)

    def _fail(self, index: int, rec: TaskRecord, err: Error, record: bool = True) -> None:
        failure = TaskFailure(index=index, item=self.items.pop(index, None), ename=err.get("ename", ""),
                              evalue=err.get("evalue", ""), traceback=err.get("traceback", ""),
                              engine_id=rec.engine_id, host=rec.host, attempts=rec.attempts)
        self.finished.add(index)
        self.res.failed.append(failure)
        self.res._set(index, failure)
        if record and self.journal is not None:
            self.journal.add(rec, None, failure.item, self.opts.key)
        self.bar.tick()

    def requeue(self, indices: list[int], eid: int | None, why: str) -> None:
        """Run again without spending retries (engine lost, straggler aborted, not run)."""
        for i in indices:
            if i in self.finished:
                continue
            rec = self.records[i]
            rec.resubmits += 1
            rec.history.append((eid, None, None, None, why))
            self.redo.appendleft(i)

    # ------------------------------------------------------------ supervision's entries

    def may_speculate(self, index: int) -> bool:
        """Whether a second copy of a running task may still be worth sending."""
        return index not in self.speculated and index not in self.finished

    def straggler(self, index: int, eid: int | None, started: float, now: float) -> None:
        """A task aborted as a straggler: its copy elsewhere is not charged, and avoids ``eid``."""
        self.speculated.add(index)
        if eid is not None:
            self.avoid.setdefault(index, set()).add(eid)
        rec = self.records[index]
        rec.resubmits += 1
        rec.history.append((eid, None, started, now, STRAGGLER))

    def mark_undone(self) -> None:
        """Allocation ending: what was not handed out is reported, not lost."""
        undone = list(self.redo)
        self.redo.clear()
        if not self.source_done:
            for index, _item in self.source:
                self.records[index] = TaskRecord(index=index)
                undone.append(index)
            self.source_done = True
        for i in undone:
            self.records[i].outcome = UNDONE
            self.items.pop(i, None)
        self.res.undone.extend(sorted(undone))

    def give_up(self, outstanding: list[int]) -> MapResult:
        """No engine is left: every task not finished is undone; the result as it stands."""
        self.redo.clear()
        for i in outstanding:
            if i not in self.finished:
                self.records[i].outcome = UNDONE
                self.res.undone.append(i)
        self.mark_undone()
        return self.close()

    def close(self) -> MapResult:
        """The result with every task's record, in input order."""
        self.res.records = [self.records[i] for i in sorted(self.records)]
        self.res.finished_at = time.time()
        return self.res
