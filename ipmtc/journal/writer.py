"""Recording finished tasks: queued in memory, committed in batches, folded into the tasks table.

The dispatcher's thread only queues (:meth:`Writer.add`, :meth:`Writer.add_chunk`);
a background thread commits what is queued as one record of the inbox file
(:mod:`.inbox`), one ``write()`` per commit -- a *group commit*: whenever the
thread is idle, what was queued meanwhile is committed at once, so a finished
task is in the kernel a fraction of a millisecond after the driver received it,
and tasks that arrive during a commit share the next one. A driver SIGKILLed at
any moment therefore loses only what arrived during the last commit. The thread
fsyncs the inbox at most every second (and the journal's release does at the
end), so a crash of the node loses at most that second.
:meth:`Writer.merge` folds the inbox into the ``tasks`` table: when the journal is
opened or closed (unless that would add noticeably to a very short map) and in
:meth:`~ipmtc.journal.Journal.compact`.

The thread refers to the :class:`Writer` and its :class:`~.store.Store`, never to
the :class:`~ipmtc.journal.Journal`, so a journal that is dropped unclosed can be
collected; its finalizer then calls :meth:`Writer.abandon` (the thread ends
without writing) and releases the store.
"""
from __future__ import annotations

import itertools
import operator
import pickle
import sqlite3
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ..errors import JournalError, JournalWarning
from ..outcomes import OK
from . import inbox
from .inbox import SYNC_INTERVAL_S
from .reader import Row, inbox_rows
from .store import _INSERT, Store

if TYPE_CHECKING:
    from ..records import TaskRecord

FLUSH_INTERVAL_S = 0.5  # the longest the thread sleeps without being woken (nothing waits on it)
BATCH = 2_000  # kept for the API: the thread now commits whenever it is idle
MAX_PENDING = 200_000  # back-pressure: add() writes itself when the writer lags this far behind
MERGE_ALWAYS = 5_000  # close() folds the inbox into the tasks table when it holds at most this many records,
MERGE_COST_S = 8e-6  # or when folding (about this much per record)
MERGE_SHARE = 0.05  # costs at most this share of the time the journal was open

_RECORD_ROW = operator.attrgetter("key", "index", "outcome", "attempts", "resubmits", "engine_id", "host", "pid",
                                  "started", "finished", "error")  # a TaskRecord as an inbox row

Chunk = tuple[dict[str, Any], bytes, int]  # (header, the engine's pickled rows, tasks): see add_chunk
Batch = tuple[int, bytes, bytes | None]  # one batch of an inbox row: (tasks, rows, vals)


class Writer:
    """The queues of finished tasks, the thread that commits them, and the fold into the tasks table."""

    def __init__(self, store: Store, flush_interval_s: float, batch: int) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.batch = batch
        self.error: JournalError | None = None  # set when recording failed during a map
        self.n_recorded = 0  # tasks committed by this driver
        self.n_unrecorded = 0  # finished tasks this driver could not record
        self.pickle_problem: str | None = None
        # finished tasks not committed yet: records and results in two queues (no tuple per task);
        # add() appends the record first, so the writer takes len(_values) of each
        self._records: deque[TaskRecord] = deque()
        self._values: deque[Any] = deque()
        # whole chunks as the engines made them (add_chunk)
        self._chunks: deque[Chunk] = deque()
        self._items: deque[tuple[Any, Callable[[Any], str] | None]] = deque()  # inputs of records the writer keys
        self._opened_at = 0.0
        self._wake = threading.Event()
        self.unfolded = 0  # tasks in the inbox (not folded into the tasks table)
        self._synced_at = 0.0
        self._idle = False  # the thread waits for work: the next add wakes it (group commit)
        # a map's dispatcher commits itself each time its loop has taken answers in (see Journal.driven):
        # an add then does not wake the thread, whose every wake-up would take the GIL from the map's loop
        self.driven = False
        self._stopping = False  # close(): write what is queued, then end
        self._abandoned = False  # the journal was collected unclosed: end without writing
        self._thread: threading.Thread | None = None
        self._reported = False
        self._pickle_reported = False

    # ------------------------------------------------------------ queueing (the dispatcher's thread)

    def add(self, rec: TaskRecord, value: Any, item: Any, key_of: Callable[[Any], str] | None) -> None:
        """Queue a finished task (see :meth:`Journal.add`)."""
        if self.error is not None:
            self._unrecorded(1)
            return
        if rec.key is None:
            self._items.append((item, key_of))
        self._records.append(rec)
        q = self._values
        q.append(value)
        if self._idle and not self.driven:  # read after the append: the thread re-checks after going idle
            self._idle = False
            self._wake.set()
        elif len(q) >= MAX_PENDING:  # the writer lags far behind: write here (back-pressure)
            self.write_pending()

    def add_chunk(self, part: tuple[bytes, bytes], n: int, engine_id: int | None, host: str, pid: int,
                  skip: list[int], overrides: dict[int, tuple[int, int]]) -> None:
        """Queue the ok tasks of one chunk as the engine pickled them (see :meth:`Journal.add_chunk`)."""
        if self.error is not None:
            self._unrecorded(n)
            return
        keys, entries = part  # the keys ride in the header, still pickled: nobody unpickles them until read
        head = {"chunk": 1, "engine_id": engine_id, "host": host, "pid": pid, "skip": skip, "over": overrides,
                "keys": keys}
        self._chunks.append((head, entries, n))
        if self._idle and not self.driven:
            self._idle = False
            self._wake.set()

    def _unrecorded(self, n: int) -> None:
        """Count ``n`` tasks offered after writing failed as unrecorded (and say so, once)."""
        self.n_unrecorded += n
        self.report()

    def report(self) -> None:
        """Warn, once each, that recording failed and that some tasks cannot be recorded."""
        if self.error is not None and not self._reported:
            self._reported = True
            warnings.warn(str(self.error), JournalWarning, stacklevel=3)
        if self.pickle_problem and not self._pickle_reported:
            self._pickle_reported = True
            warnings.warn(f"journal {self.store.path}: some tasks cannot be recorded ({self.pickle_problem}); "
                          "they will be computed again on a rerun", JournalWarning,
                          stacklevel=3)

    # ------------------------------------------------------------ the background thread

    def start(self, first: Callable[[], None] | None = None) -> None:
        """Start the thread; ``first``, if given, is its first job (a new journal's fsync)."""
        self._opened_at = self._synced_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(first,),
                                        name=f"ipmtc-journal-{self.store.path.name}", daemon=True)
        self._thread.start()

    def _pending(self) -> bool:
        return bool(self._values or self._chunks)

    def _run(self, first: Callable[[], None] | None) -> None:
        if first is not None:
            self._guarded(first)
        while True:
            if not self._pending() and not self._stopping:
                self._idle = True
                if not self._pending() or self.driven:  # an add between the check and idle=True saw idle=False
                    self._wake.wait(self._sleep_s())
                self._idle = False
                self._wake.clear()
            if self._abandoned:
                return
            stopping = self._stopping
            self.write_safely()
            if time.monotonic() - self._synced_at >= SYNC_INTERVAL_S:
                self._guarded(self._sync)
            if stopping:
                return

    def _sleep_s(self) -> float:
        """How long the idle thread may wait: until the next fsync is due, if one is."""
        box = self.store.inbox
        if box is not None and box.dirty:
            return max(0.0, self._synced_at + SYNC_INTERVAL_S - time.monotonic())
        return self.flush_interval_s

    def _sync(self) -> None:
        with self.store.write_lock:  # (release() hands the file to another thread under this lock)
            self._synced_at = time.monotonic()
            if self.store.inbox is not None and not self._abandoned:
                self.store.inbox.sync()

    def _guarded(self, job: Callable[[], None]) -> None:
        """Run ``job``; a failure becomes :attr:`error` (the map goes on; its end says so)."""
        try:
            job()
        except Exception as e:
            if self.error is None:
                self.error = e if isinstance(e, JournalError) else JournalError(
                    self.store.write_error_message(e, opening=False, recorded=self.n_recorded))

    def write_safely(self) -> None:
        """:meth:`write_pending`, any failure kept in :attr:`error` (the map goes on; never raises)."""
        self._guarded(self.write_pending)

    def finish(self) -> None:
        """Stop the thread, commit what is queued, fold the inbox in (unless too costly now), end the run."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.write_safely()
        if self.error is None:
            try:
                self._fold_on_close()
            except Exception:
                pass  # recorded batches stay in the inbox; the next open folds them in

    def abandon(self) -> None:
        """Tell the thread to end without writing anything more (the journal's finalizer; never joins)."""
        self._abandoned = True
        self._wake.set()

    # ------------------------------------------------------------ committing

    def write_pending(self) -> None:
        """Commit the queued records as one batch and each queued chunk as one more, in one inbox record."""
        with self.store.write_lock:
            if self._abandoned:
                return
            rows, values, chunks = self._take()
            if not rows and not chunks:
                return
            in_chunks = sum(c[2] for c in chunks)
            if self.error is not None:
                self.n_unrecorded += len(rows) + in_chunks
                return
            rows, batches = self._encode(rows, values, chunks)
            if batches:
                self._commit(batches, len(rows) + in_chunks)

    def _take(self) -> tuple[list[Row], list[Any], list[Chunk]]:
        """Empty the queues: records as inbox rows (keyed here where the dispatcher did not), results, chunks."""
        n = len(self._values)
        chunks = [self._chunks.popleft() for _ in range(len(self._chunks))]
        pop_r, pop_v = self._records.popleft, self._values.popleft
        recs = [pop_r() for _ in range(n)]
        values = [pop_v() for _ in range(n)]
        if self._items:
            recs, values = self._keyed(recs, values)
        return list(map(_RECORD_ROW, recs)), values, chunks

    def _keyed(self, recs: list[TaskRecord], values: list[Any]) -> tuple[list[TaskRecord], list[Any]]:
        """Key the records the dispatcher left unkeyed; one whose input cannot be keyed is not recorded."""
        pop_i = self._items.popleft
        keep_r, keep_v = [], []
        for rec, value in zip(recs, values):
            if rec.key is None:
                item, key_of = pop_i()
                try:
                    rec.key = cast(Callable[[Any], str], key_of)(item)  # given with every record without a key
                except Exception as e:  # e.g. an input that cannot be pickled: that task alone goes unrecorded
                    self.n_unrecorded += 1
                    if self.pickle_problem is None:
                        self.pickle_problem = f"task {rec.index}: its input cannot be keyed: {type(e).__name__}: {e}"
                    continue
            keep_r.append(rec)
            keep_v.append(value)
        return keep_r, keep_v

    def _encode(self, rows: list[Row], values: list[Any], chunks: list[Chunk]) -> tuple[list[Row], list[Batch]]:
        """The inbox rows of one commit; ``rows`` without the records whose result cannot be pickled."""
        # each result pickled on its own (a lookup or the fold never has to unpickle the others)
        dumps, proto = pickle.dumps, pickle.HIGHEST_PROTOCOL
        try:
            blobs = [dumps(v, protocol=proto) if row[2] == OK else None for row, v in zip(rows, values)]
        except Exception:  # some result cannot be pickled: record the others
            rows, blobs = self._picklable(rows, values)
        batches: list[Batch] = [(len(rows), dumps(rows, protocol=proto), dumps(blobs, protocol=proto))] if rows else []
        batches += [(k, dumps(head, protocol=proto), blob) for head, blob, k in chunks]
        return rows, batches

    def _picklable(self, rows: list[Row], values: list[Any]) -> tuple[list[Row], list[bytes | None]]:
        keep_rows, blobs = [], []
        for row, v in zip(rows, values):
            try:
                blob = pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL) if row[2] == OK else None
            except Exception as e:
                self.n_unrecorded += 1
                if self.pickle_problem is None:
                    self.pickle_problem = f"task {row[1]}: its result cannot be pickled: {type(e).__name__}: {e}"
                continue
            keep_rows.append(row)
            blobs.append(blob)
        return keep_rows, blobs

    def _commit(self, batches: list[Batch], total: int) -> None:
        """One inbox record holding every batch (one ``write()``); a failure is kept in :attr:`error`."""
        box = self.store.inbox
        try:
            if box is None:
                raise JournalError(f"journal {self.store.path} is closed")
            box.append(cast(int, self.store.run), time.time(), total, [(r, v) for _, r, v in batches])
        except (OSError, JournalError) as e:
            self.n_unrecorded += total
            self.error = e if isinstance(e, JournalError) else JournalError(
                self.store.write_error_message(e, opening=False, recorded=self.n_recorded))
            return
        self.n_recorded += total
        self.unfolded += total

    # ------------------------------------------------------------ folding the inbox into the tasks table

    def merge(self) -> None:
        """Fold the inbox into the tasks table (one transaction: all of it or nothing, oldest first), then
        empty the inbox (a crash in between folds the same records again: no change)."""
        with self.store.write_lock:
            recs = inbox.records(self.store.inbox_path)  # read one at a time
            first = next(recs, None)
            if first is not None:
                conn = self.store.writer()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for run, recorded, _, batches in itertools.chain([first], recs):
                        conn.executemany(_INSERT, inbox_rows(batches, run, recorded))
                    conn.execute("COMMIT")
                except BaseException:
                    self.store.rollback()
                    raise
            if self.store.inbox is not None:
                self.store.inbox.empty()
            self.unfolded = 0

    def fold_on_open(self, unfolded: int, preload: bool) -> None:
        """At open: fold the inbox's ``unfolded`` records in when lookups go task by task (they read the
        tasks table only) or when there are few."""
        self.unfolded = unfolded
        if unfolded and (not preload or unfolded <= MERGE_ALWAYS):
            try:
                self.merge()
            except (sqlite3.Error, OSError) as e:
                raise JournalError(self.store.write_error_message(e, opening=True)) from None

    def _fold_on_close(self) -> None:
        # fold the batches into the tasks table, unless that would add noticeably to a very short map's
        # time (a later open or close does it then)
        pending = self.unfolded
        elapsed = time.monotonic() - self._opened_at
        if pending and (pending <= MERGE_ALWAYS or pending * MERGE_COST_S <= MERGE_SHARE * elapsed):
            self.merge()

    def compact(self) -> None:
        """Fold every committed batch in now (:meth:`Journal.compact`)."""
        try:
            self.merge()
        except (sqlite3.Error, OSError) as e:
            raise JournalError(self.store.write_error_message(e, opening=False, recorded=self.n_recorded)) from None
