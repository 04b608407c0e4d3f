"""The book of one map's tasks: what is left to hand out, what each attempt cost, how each task ended.

The ledger draws inputs from the source (skipping those a journal already holds),
keeps each task's :class:`~.result.TaskRecord`, and settles a chunk's
:class:`~.transport.Completion` task by task: an ok result goes to the
:class:`~.result.MapResult` (and the journal); a task's own failure (an exception,
a walltime or memory kill) spends one of its retries, and a retry avoids the engine
it failed on; a task whose engine was lost, whose straggler copy was aborted, or
that its chunk did not reach is put back in line without spending any (a resubmit).
A lost engine's running chunk goes through :mod:`.crashes` (a task that keeps
taking engines down fails as ``EngineCrashes``).

Only the ledger writes the result and the journal. Its bookkeeping is O(tasks
unfinished): inputs, records of running tasks, the retry line. What it keeps of
finished tasks is the map's result (values and records, as ``MapResult`` promises);
in streaming mode (:func:`~ipmtc.maps.api.imap`) it keeps nothing of them: each
result goes to :attr:`Ledger.ready` for the caller, each record into a tally.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..outcomes import ABORTED, CHARGED, CRASHED, LOST, OK, RAISED, STRAGGLER, UNDONE
from ..records import from_stored
from ..stats import Tally
from .crashes import Crashes
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
        self.keep = not opts.stream  # keep finished tasks' values and records (MapResult)
        # look tasks up (and key them before they run) only in a journal that holds some
        self.lookups = self.journal is not None and opts.key is not None and self.journal.has_records
        self.source_done = False
        self.n_taken = 0  # inputs drawn from the source so far
        self.n_finished = 0
        self.items: dict[int, Any] = {}  # inputs of tasks not finished yet (needed to resubmit)
        self.records: dict[int, TaskRecord] = {}  # unfinished tasks (and, when keeping, finished ones)
        self.finished: set[int] = set()  # when keeping: finished tasks (else: drawn and not in records)
        self.redo: deque[int] = deque()  # tasks to hand out again, before new ones
        self.avoid: dict[int, set[int]] = {}  # task -> engines it failed on (or straggled on)
        self.speculated: set[int] = set()  # stragglers whose second copy was sent
        self.crashes = Crashes(opts.crash_limit)
        self.hosts: dict[int, str] = {}  # engine -> the host it answered from
        self.dead: set[int] = set()  # engines whose death was booked (a later chunk sent there never ran)
        self.n_retried = 0
        self.times = TaskTimes()
        self.tally = Tally()  # streaming: the finished tasks' counts
        self.ready: deque[tuple[int, Any]] = deque()  # streaming: results not handed to the caller yet
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
        return None if self.n_total is None else self.n_total - self.n_finished

    def is_finished(self, index: int) -> bool:
        return index in self.finished if self.keep else index not in self.records

    def _finish(self, index: int, value: Any) -> None:
        """``index`` ended (ok or failed for good): its value to the result, its bookkeeping dropped."""
        self.n_finished += 1
        self.items.pop(index, None)
        self.avoid.pop(index, None)
        self.crashes.cleared(index)
        if self.keep:
            self.finished.add(index)
            self.res._set(index, value)
        else:
            self.tally.add(self.records.pop(index))
            self.speculated.discard(index)
            self.ready.append((index, value))
        self.bar.tick()

    # ------------------------------------------------------------ handing out

    def take(self, n: int, target: int, engines: list[int], idle: bool = True) -> list[int]:
        """Up to ``n`` tasks for ``target``: those in line first, then new inputs (journal hits settled here).

        A task under crash suspicion goes alone, in a chunk of its own, to an ``idle`` engine only.
        """
        out = self._take_redo(n, target, engines, idle)
        if out and out[0] in self.crashes.alone:
            return out
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

    def _take_redo(self, n: int, target: int, engines: list[int], idle: bool) -> list[int]:
        out: list[int] = []
        passed: list[int] = []
        alone = self.crashes.alone
        while self.redo and len(out) < n:
            i = self.redo.popleft()
            avoid = self.avoid.get(i)
            # a retry runs elsewhere than where it failed, while another live engine exists
            if avoid and target in avoid and any(e not in avoid for e in engines):
                passed.append(i)
            elif i in alone:
                if out or not idle:  # alone, on an engine with nothing else on it
                    passed.append(i)
                    continue
                out.append(i)
                break
            else:
                out.append(i)
        self.redo.extendleft(reversed(passed))
        return out

    def _from_journal(self, index: int, rec: TaskRecord, hit: tuple[Any, dict[str, Any]]) -> None:
        value, stored = hit
        from_stored(rec, stored)
        self.res.journal_hits += 1
        if rec.outcome == OK:
            self._finish(index, value)
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
            if done.crashed:  # its engine died under it (the channel saw its connection drop)
                self.engine_died(eid, [indices, *done.also_lost])
            else:
                self.requeue(indices, eid, LOST)
        elif done.error is not None:
            now = time.time()
            for i in indices:
                self._charge(i, done.error, eid, None, None, now, now, RAISED)
        else:
            if eid is not None and done.node:
                self.hosts[eid] = done.node
            self._answered(done)

    def _answered(self, done: Completion) -> None:
        eid, node, pid = done.engine_id, done.node, done.pid
        skip: list[int] = []  # journal entries not to record (a duplicate that lost the race)
        over: dict[int, tuple[int, int]] = {}  # (attempts, resubmits) where not (1, 0)
        for index, _, value, started, finished in done.entries:
            if self.is_finished(index):
                skip.append(index)
                continue
            rec = self._ok(index, value, eid, node, pid, started, finished)
            if rec.attempts != 1 or rec.resubmits:
                over[index] = (rec.attempts, rec.resubmits)
        for index, status, payload, started, finished in done.rows:
            if self.is_finished(index):
                continue  # a speculative duplicate lost the race: discard it
            if status == OK:
                item = self.items.get(index)
                rec = self._ok(index, payload, eid, node, pid, started, finished)
                if self.journal is not None:
                    self.journal.add(rec, payload, item, self.opts.key)
            elif status in CHARGED:
                self._charge(index, payload, eid, node, pid, started, finished, status)
            elif not (status == ABORTED and index in self.speculated):  # else its duplicate runs elsewhere
                self.requeue([index], eid, status)  # aborted straggler / not run: back in line, uncharged
        if done.entries and done.journal_part is not None and self.journal is not None:
            self.journal.add_chunk(done.journal_part, len(done.entries) - len(skip), eid, node, pid, skip, over)

    def _ok(self, index: int, value: Any, eid: int | None, node: str, pid: int, started: float,
            finished: float) -> TaskRecord:
        rec = self.records[index]
        rec.engine_id, rec.host, rec.pid = eid, node, pid
        rec.started, rec.finished = started, finished
        rec.attempts += 1
        rec.outcome, rec.error = OK, None
        self.times.learn(finished - started)
        self._finish(index, value)
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
        failure = TaskFailure(index=index, item=self.items.get(index), ename=err.get("ename", ""),
                              evalue=err.get("evalue", ""), traceback=err.get("traceback", ""),
                              engine_id=rec.engine_id, host=rec.host, attempts=rec.attempts)
        self.res.failed.append(failure)
        if record and self.journal is not None:
            self.journal.add(rec, None, failure.item, self.opts.key)
        self._finish(index, failure)

    def requeue(self, indices: list[int], eid: int | None, why: str) -> None:
        """Run again without spending retries (engine lost, straggler aborted, not run)."""
        for i in indices:
            if self.is_finished(i):
                continue
            rec = self.records[i]
            rec.resubmits += 1
            rec.history.append((eid, None, None, None, why))
            self.redo.appendleft(i)

    def engine_died(self, eid: int | None, chunks: list[list[int]], node_loss: bool = False) -> None:
        """``eid`` died with ``chunks`` unanswered: resubmitted, under suspicion or charged (see :mod:`.crashes`).

        Every unanswered task on the engine is a candidate (one that finished may not have had
        its answer out before the engine went). One candidate alone is charged a crash; several
        become suspects, each run alone on an otherwise idle engine next.
        """
        tasks = [i for chunk in chunks for i in chunk if not self.is_finished(i)]
        first = eid is None or eid not in self.dead  # a chunk sent after the death never ran there
        if eid is not None:
            self.dead.add(eid)
        if node_loss or not first or len(tasks) != 1:
            if not node_loss and first and tasks:
                self.crashes.suspect(tasks)
            self.requeue(tasks, eid, LOST)
            return
        index = tasks[0]
        host = self.hosts.get(eid) if eid is not None else None
        rec = self.records[index]
        rec.crashes += self.crashes.charge(index, eid, host)
        rec.history.append((eid, host, None, time.time(), LOST))
        if not self.crashes.over(rec.crashes):
            rec.resubmits += 1
            self.redo.appendleft(index)
            return
        rec.engine_id, rec.host, rec.outcome = eid, host, CRASHED
        message = self.crashes.message(index, rec.crashes)
        rec.error = f"EngineCrashes: {message}"
        self._fail(index, rec, {"ename": "EngineCrashes", "evalue": message, "traceback": ""})

    # ------------------------------------------------------------ supervision's entries

    def may_speculate(self, index: int) -> bool:
        """Whether a second copy of a running task may still be worth sending."""
        return index not in self.speculated and not self.is_finished(index)

    def straggler(self, index: int, eid: int | None, started: float, now: float) -> None:
        """A task aborted as a straggler: its copy elsewhere is not charged, and avoids ``eid``."""
        self.speculated.add(index)
        if eid is not None:
            self.avoid.setdefault(index, set()).add(eid)
        rec = self.records[index]
        rec.resubmits += 1
        rec.history.append((eid, None, started, now, STRAGGLER))

    def mark_undone(self, more: list[int] | None = None) -> None:
        """Allocation ending (or no engine left): what was not handed out is reported, not lost."""
        undone = [i for i in (more or []) if not self.is_finished(i)] + list(self.redo)
        self.redo.clear()
        if not self.source_done:
            for index, _item in self.source:
                self.records[index] = TaskRecord(index=index)
                undone.append(index)
            self.source_done = True
        for i in dict.fromkeys(undone):
            self.records[i].outcome = UNDONE
            self.items.pop(i, None)
            self.res.undone.append(i)
            if not self.keep:
                self.tally.add(self.records.pop(i))

    def give_up(self, outstanding: list[int]) -> MapResult:
        """No engine (or no controller) is left: every task not finished is undone; the result as it stands."""
        self.mark_undone(outstanding)
        return self.close()

    def close(self) -> MapResult:
        """The result with every task's record, in input order."""
        if self.keep:
            self.res.records = [self.records[i] for i in sorted(self.records)]
        self.res.undone.sort()
        self.res.finished_at = time.time()
        return self.res
