"""The :class:`Journal`: the one object a map, ``ipmtc run``, ``ipmtc journal show`` and ``report`` use.

A facade over three parts, each in its own module: the :class:`~.store.Store`
(the file, its lock and connections), the :class:`~.writer.Writer` (queues,
background commits, the fold into the tasks table) and the
:class:`~.reader.Lookups` (finished tasks by key), plus :mod:`.reader`'s queries.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import JournalError
from ..keys import function_id
from . import reader
from .reader import Lookups
from .store import Contents, Store, foreign_function
from .writer import BATCH, FLUSH_INTERVAL_S, Writer

if TYPE_CHECKING:
    import sqlite3

    from ..records import TaskRecord


def _let_go(store: Store, writer: Writer) -> None:
    """Finalizer of a journal collected without :meth:`Journal.close`: let go of the file and the lock.

    Commits nothing and joins no thread: the writer thread is told to end
    without writing, and what was queued but not committed is lost, as in a
    crash (a rerun runs those tasks again).
    """
    writer.abandon()
    store.release()


class Journal:
    """An open journal. Use :meth:`open`; pass it (or just its path) as ``journal=`` to a map."""

    def __init__(self, store: Store, *, readonly: bool, retry_failed: bool, flush_interval_s: float,
                 batch: int) -> None:  # use Journal.open
        self.path: Path = store.path
        self.readonly = readonly
        self._store = store
        self._lookups = Lookups(store, retry_failed)
        self._writer = Writer(store, flush_interval_s, batch)
        self._closed = False
        # the writer thread refers to the writer and the store only, so this journal can be collected
        self._finalizer = weakref.finalize(self, _let_go, store, self._writer)

    # ------------------------------------------------------------ opening and closing

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, fn: Callable[..., Any] | None = None, retry_failed: bool = False,
             context: dict[str, str] | None = None, readonly: bool = False,
             flush_interval_s: float = FLUSH_INTERVAL_S, batch: int = BATCH) -> Journal:
        """Open (or create) the journal at ``path`` for a map of ``fn``.

        ``context``: more identity of the map (``ipmtc run`` gives its output
        directory); a journal written with another context is refused.
        ``readonly=True`` opens an existing journal for inspection only (no
        lock, no ``fn``; works while a driver is writing it).

        Raises :class:`JournalError` with a one-line message when the file is
        not a journal, was written by an incompatible version, belongs to
        another function or context, is in use by another driver, or cannot be
        written.
        """
        self = cls(Store(Path(path)), readonly=bool(readonly), retry_failed=bool(retry_failed),
                   flush_interval_s=float(flush_interval_s), batch=max(1, int(batch)))
        store = self._store
        if readonly:
            store.open_readonly()
            return self
        if fn is None:
            raise JournalError(f"journal {self.path}: opening a journal for writing needs the mapped function "
                               "(fn=...)")
        store.function = function_id(fn)
        try:
            store.lock()
            new = store.create_new(context or {})  # a new journal: written whole, nothing to look up
            contents = Contents(records=0, value_bytes=0, inbox=0) if new else store.open_rw(context or {})
            store.open_inbox()
            self._lookups.size_up(contents)
            self._writer.fold_on_open(contents.inbox, self._lookups.preload)
        except BaseException:
            self._finalizer()
            raise
        self._writer.start(store.sync_new if new else None)  # (its fsync: the thread's first job)
        return self

    def close(self) -> None:
        """Commit what is queued, release the lock. Idempotent; never raises for a failed write."""
        if self._closed:
            return
        try:
            if not self.readonly:
                self._writer.finish()
                self._writer.report()
        finally:
            self._closed = True
            self._lookups.forget()
            self._finalizer()  # closes the connections, releases the lock

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self.readonly else "open")
        return f"<Journal {str(self.path)!r} of {self.function} ({state})>"

    def _refused(self, what: str) -> JournalError:
        return JournalError(f"journal {self.path} is {'closed' if self._closed else 'open read-only'}; {what}")

    # ------------------------------------------------------------ the dispatcher's side

    def lookup(self, key: str) -> tuple[Any, dict[str, Any]] | None:
        """``(value, stored)`` of a finished task, or None if it must run.

        A failed task is a hit (it stays failed) unless the journal was opened
        with ``retry_failed=True``. Only tasks recorded before this journal was
        opened are found.
        """
        return self._lookups.lookup(key)

    def add(self, rec: TaskRecord, value: Any, item: Any = None, key_of: Callable[[Any], str] | None = None) -> None:
        """Record a finished task (``rec`` a :class:`~ipmtc.records.TaskRecord`, ``value`` None if it failed).

        Cheap: the record is queued; the background writer commits it with the
        next group commit (milliseconds). The record must not change afterwards (the
        dispatcher never touches a finished task's record again). A record
        without a key gets ``key_of(item)`` from the writer (off the map's path:
        a map over a new journal looks nothing up, so it needs no key up front).
        """
        if self._closed or self.readonly:
            raise self._refused("cannot record tasks")
        self._writer.add(rec, value, item, key_of)

    def add_chunk(self, part: tuple[bytes, bytes], n: int, engine_id: int | None, host: str, pid: int,
                  skip: list[int], overrides: dict[int, tuple[int, int]]) -> None:
        """Record the ok tasks of one chunk as the engine pickled them (``runner._for_journal``).

        ``part``: the tasks' keys and rows (index, "ok", result, started, finished), each pickled;
        ``skip``: indices not to record (duplicates); ``overrides``: index -> (attempts,
        resubmits) where not (1, 0). Stored as one batch, as it came, so a map with a journal does
        no per-task work for it here.
        """
        if self._closed or self.readonly:
            raise self._refused("cannot record tasks")
        self._writer.add_chunk(part, n, engine_id, host, pid, skip, overrides)

    def flush(self) -> None:
        """Commit everything queued now. Never raises for a failed write: see :attr:`error`."""
        if self._closed or self.readonly:
            return
        self._writer.write_safely()
        self._writer.report()

    @contextlib.contextmanager
    def driven(self) -> Iterator[None]:
        """While inside, the caller commits: it calls :meth:`flush` each time it has added what arrived.

        A map's dispatcher does so after each batch of answers: the group commit then
        happens in its own thread, between two waits, and the background thread only
        fsyncs (each second) and commits what is left after ``flush_interval_s``. On a
        busy node every wake-up of another thread can stall the map's loop.
        """
        self._writer.driven = True
        try:
            yield
        finally:
            self._writer.driven = False

    def compact(self) -> None:
        """Fold every committed batch into the ``tasks`` table now (for queries with plain SQL)."""
        if self._closed or self.readonly:
            raise self._refused("open it for writing to compact it")
        self.flush()
        self._writer.compact()

    def check_function(self, fn: Callable[..., Any]) -> None:
        """Raise :class:`JournalError` unless this journal was opened for a map of ``fn``."""
        fid = function_id(fn)
        if self.function != fid:
            raise foreign_function(self.path, self.function, fid)

    def check(self) -> None:
        """Raise :attr:`error` if recording failed during the map."""
        if self.error is not None:
            raise self.error

    # ------------------------------------------------------------ state

    @property
    def function(self) -> str | None:
        """``module:qualname`` of the function whose map this journal records."""
        return self._store.function

    @property
    def run(self) -> int | None:
        """This driver's run number (``runs.run``) when opened for writing."""
        return self._store.run

    @property
    def retry_failed(self) -> bool:
        return self._lookups.retry_failed

    @property
    def has_records(self) -> bool:
        """Whether tasks were recorded before this journal was opened (else no lookup can hit)."""
        return self._lookups.had_rows

    @property
    def hits_ok(self) -> int:
        return self._lookups.hits_ok

    @property
    def hits_failed(self) -> int:
        return self._lookups.hits_failed

    @property
    def hit_keys(self) -> set[str]:
        """Keys of the tasks :meth:`lookup` found (done or failed)."""
        return self._lookups.hit_keys

    @property
    def error(self) -> JournalError | None:
        """Set when recording failed during a map (the map goes on; see :meth:`check`)."""
        return self._writer.error

    @property
    def n_recorded(self) -> int:
        """Tasks committed by this driver."""
        return self._writer.n_recorded

    @property
    def n_unrecorded(self) -> int:
        """Finished tasks this driver could not record."""
        return self._writer.n_unrecorded

    @property
    def pickle_problem(self) -> str | None:
        """The first result that could not be pickled (not recorded), if any."""
        return self._writer.pickle_problem

    @property
    def flush_interval_s(self) -> float:
        return self._writer.flush_interval_s

    @property
    def batch(self) -> int:
        return self._writer.batch

    # ------------------------------------------------------------ reading (ipmtc journal show, report)

    def _reader(self) -> sqlite3.Connection:
        return self._store.reader()

    def meta(self) -> dict[str, str]:
        return reader.meta(self._reader())

    def runs(self) -> list[dict[str, Any]]:
        return reader.runs(self._reader(), self._store.inbox_path)

    def counts(self) -> dict[str, int]:
        """Recorded tasks by outcome."""
        return reader.counts(self._reader(), self._store.inbox_path)

    def rows(self, *, failed_only: bool = False, values: bool = False) -> Iterator[dict[str, Any]]:
        """Every recorded task as a dict (by run, then input position); optionally only failed ones, with results."""
        yield from reader.rows(self._reader(), self._store.inbox_path, failed_only=failed_only, values=values)
