"""The task journal: an SQLite file that lets a killed or interrupted map pick up where it stopped.

``dynamic_map(fn, items, journal="run.db")`` records every finished task (its key,
outcome, attempts, engine, host, times, error, and its result pickled). Running
the same map again with the same journal hands back the stored results of
finished tasks and runs only the rest; ``retry_failed=True`` (``--retry-failed``)
also reruns the tasks recorded as failed.

Task keys
    A task's key is a hash of the function's identity (module + qualified name)
    and of its input (see :func:`task_key`); or whatever ``key=`` returns.
    **The key does not include the function's code.** Changing the body of
    the function and rerunning with the same journal hands back the results the
    *old* code computed. After changing the code, use a new journal file (or
    delete the old one), or give ``key=`` a function that includes a version.
    Inputs are encoded canonically (ints, floats, strings, bytes, None, bools,
    tuples, lists, dicts and sets, nested; dict and set order do not matter);
    other objects by their pickle, which is stable for most types (objects that
    hold sets of strings may pickle differently from one process to the next:
    such tasks are then simply run again).

Storage and safety
    The driver's background thread commits finished tasks in batches (every
    ``flush_interval_s``, 0.5 s, or every ``batch`` records): one transaction
    appends rows to the ``inbox`` table, WAL mode, ``synchronous=FULL``. With
    the default key, the engines do the per-task work: each chunk comes back
    with its tasks' keys and results in one pickle, which becomes one
    inbox row as it is (plus a small header: engine, host, pid, attempts where
    not 1, duplicates to skip), so the driver does no per-task journal work.
    Other records (a user's ``key=``, failures, results plain pickle cannot
    take) go as one row per batch (records as one pickled list of plain
    tuples, results each pickled on its own; their keys worked out by the
    writer thread when the journal held nothing to look up). The ``inbox`` is folded into the ``tasks`` table (one
    row per task, the key its primary key, the result pickled) in one
    transaction when the journal is closed (unless that would add more than 5%
    to a very short map; the next open or a later close does it then, or
    :meth:`Journal.compact`). Every
    reader here (lookups, ``ipmtc journal show``, :meth:`Journal.rows`) sees
    both tables, the newest record of a key winning.

    A task is *recorded* once its batch is committed. If the driver dies at
    any moment (SIGKILL included), every recorded task survives and is never
    run again; at most the last half second of finished-but-unrecorded tasks
    runs again. No task is recorded twice: the key is the ``tasks`` table's
    primary key, the fold deletes the batches it folded in the same
    transaction, and a rerun of a failed task replaces its row.

    One driver at a time: the journal holds an exclusive ``flock`` on
    ``<journal>.lock`` while open; the kernel releases it when the driver dies.
    (On Lustre the file system must be mounted with ``-o flock``.)

    If the journal cannot be written while a map runs (disk full, quota, file
    system gone read-only), the map goes on with its results in memory, a
    :class:`JournalWarning` is issued at once, and :attr:`Journal.error` holds
    the :class:`~ipmtc.errors.JournalError`; tasks recorded before the failure
    stay recorded. A journal that cannot be written at all is refused when it
    is opened, before anything runs.
"""
from __future__ import annotations

import errno
import fcntl
import json
import operator
import os
import pickle
import socket
import sqlite3
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import JournalError, JournalWarning
from .keys import function_id, key_for, key_function, key_prefix, keys_for, task_key  # noqa: F401 (API)

SCHEMA_VERSION = 1
APPLICATION = "ipmtc-journal"
FLUSH_INTERVAL_S = 0.5
BATCH = 2_000  # queued records that wake the writer before its interval is up
MAX_PENDING = 200_000  # back-pressure: add() writes itself when the writer lags this far behind
MERGE_ALWAYS = 5_000  # close() folds the inbox into the tasks table when it holds at most this many records,
MERGE_COST_S = 8e-6  # or when folding (about this much per record)
MERGE_SHARE = 0.05  # costs at most this share of the time the journal was open
PRELOAD_MAX_ROWS = 2_000_000  # lookups read the whole journal into memory at once up to this size,
PRELOAD_MAX_BYTES = 256 << 20  # (bytes of stored results); larger journals are queried task by task

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (run INTEGER PRIMARY KEY, started REAL NOT NULL, ended REAL, host TEXT, pid INTEGER,
                   recorded INTEGER NOT NULL DEFAULT 0);
CREATE TABLE tasks (
    key TEXT PRIMARY KEY,      -- task_key(fn, item) or the user's key=
    idx INTEGER,               -- position of the input in the map that recorded it
    outcome TEXT NOT NULL,     -- ok | raised | walltime
    attempts INTEGER, resubmits INTEGER,
    engine_id INTEGER, host TEXT, pid INTEGER,
    started REAL, finished REAL,  -- epoch seconds of the last attempt
    error TEXT,                -- "Ename: message" of the last failure
    value BLOB,                -- pickled result (NULL for failures)
    run INTEGER,               -- runs.run of the driver that recorded it
    recorded REAL              -- epoch seconds of the commit
);
-- recorded batches not yet folded into tasks: one row per commit (rows and results pickled as lists)
CREATE TABLE inbox (seq INTEGER PRIMARY KEY, run INTEGER, recorded REAL, n INTEGER, rows BLOB, vals BLOB);
"""
_COLUMNS = ("key", "idx", "outcome", "attempts", "resubmits", "engine_id", "host", "pid", "started",
            "finished", "error", "value", "run", "recorded")
_INSERT = f"INSERT OR REPLACE INTO tasks ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_RECORD_ROW = operator.attrgetter("key", "index", "outcome", "attempts", "resubmits", "engine_id", "host", "pid",
                                  "started", "finished", "error")  # a TaskRecord as an inbox row
_STORED = ("outcome", "attempts", "engine_id", "host", "pid", "started", "finished", "error")


# ---------------------------------------------------------------- the journal


def _describe(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    return msg.rstrip(".")


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']}, since {since}"
    except Exception:
        return "another process"


class Journal:
    """An open journal. Use :meth:`open`; pass it (or just its path) as ``journal=`` to a map."""

    def __init__(self) -> None:  # use Journal.open
        self.path: Path = Path()
        self.function: str | None = None
        self.retry_failed = False
        self.readonly = True
        self.run: int | None = None
        self.error: JournalError | None = None  # set when recording failed during a map
        self.hits_ok = 0
        self.hits_failed = 0
        self.hit_keys: set[str] = set()
        self.n_recorded = 0  # tasks committed by this driver
        self.n_unrecorded = 0  # finished tasks this driver could not record
        self.flush_interval_s = FLUSH_INTERVAL_S
        self.batch = BATCH
        self.pickle_problem: str | None = None
        self._conn: sqlite3.Connection | None = None  # writer (background thread, flush, merges)
        self._rconn: sqlite3.Connection | None = None  # reader (lookups, queries)
        self._lock_fd: int | None = None
        self._wmu = threading.Lock()  # one writer at a time
        # finished tasks not committed yet: records and results in two queues (no tuple per task);
        # add() appends the record first, so the writer takes len(_values) of each
        self._records: deque[Any] = deque()
        self._values: deque[Any] = deque()
        # whole chunks as the engines made them (add_chunk): (header, pickled rows, tasks)
        self._chunks: deque[tuple[dict, bytes, int]] = deque()
        self._chunk_tasks = 0  # tasks queued in _chunks (approximate: wakes the writer)
        self._items: deque[Any] = deque()  # inputs of records whose key the writer works out
        self._had_rows = False
        self._preload = True
        self._index: dict[str, tuple] | None = None  # key -> stored task, read at the first lookup
        self._opened_at = 0.0
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._closed = False
        self._reported = False
        self._pickle_reported = False
        self._warned_unpickle = False

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike, *, fn: Callable | None = None, retry_failed: bool = False,
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
        self = cls()
        self.path = Path(path)
        self.retry_failed = bool(retry_failed)
        self.flush_interval_s = float(flush_interval_s)
        self.batch = max(1, int(batch))
        if readonly:
            self._open_readonly()
            return self
        if fn is None:
            raise JournalError(f"journal {self.path}: opening a journal for writing needs the mapped function "
                               "(fn=...)")
        self.readonly = False
        self.function = function_id(fn)
        try:
            self._lock()
            self._open_rw(context or {})
        except BaseException:
            self._release()
            raise
        self._opened_at = time.monotonic()
        self._thread = threading.Thread(target=self._writer, name=f"ipmtc-journal-{self.path.name}", daemon=True)
        self._thread.start()
        return self

    def _lock(self) -> None:
        p = self.path
        if p.is_dir():
            raise JournalError(f"journal {p} is a directory; give the path of a file (e.g. {p}/run.db)")
        if not p.parent.is_dir():
            raise JournalError(f"cannot create journal {p}: directory {p.parent} does not exist")
        lock_path = Path(f"{p}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise JournalError(f"cannot create the journal lock file {lock_path} ({e.strerror}): the journal's "
                               "directory must be writable; pick another journal path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _lock_holder(fd)
                os.close(fd)
                raise JournalError(f"journal {p} is in use by another driver ({holder}); wait for it to finish, "
                                   "stop it, or use another journal path") from None
            os.close(fd)
            raise JournalError(f"cannot lock journal {p} ({e.strerror}): the file system does not support flock "
                               "(Lustre: mount with -o flock); put the journal elsewhere") from None
        self._lock_fd = fd
        try:  # who holds it, for the message another driver gets
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.time()}).encode(), 0)
        except OSError:
            pass

    def _connect(self, uri: str | None = None) -> sqlite3.Connection:
        conn = sqlite3.connect(uri if uri is not None else str(self.path), uri=uri is not None,
                               isolation_level=None, check_same_thread=False, timeout=10.0)
        return conn

    def _open_rw(self, context: dict[str, str]) -> None:
        p = self.path
        try:
            conn = self._conn = self._connect()
            self._check_is_sqlite(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            now = time.time()
            if not tables:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", [
                    ("application", APPLICATION), ("schema_version", str(SCHEMA_VERSION)),
                    ("function", self.function), ("context", json.dumps(context, sort_keys=True)),
                    ("created", repr(now)), ("ipmtc_version", _ipmtc_version())])
            else:
                meta = self._check_meta(conn, tables)
                theirs = meta.get("function")
                if theirs != self.function:
                    raise JournalError(f"journal {p} belongs to a map of {theirs}, not of {self.function}; "
                                       "results of different functions are never mixed: use another journal path "
                                       "(or delete this one)")
                stored = json.loads(meta.get("context") or "{}")
                for k in sorted(set(stored) | set(context)):
                    if stored.get(k) != context.get(k):
                        raise JournalError(f"journal {p} was written with {k} {stored.get(k)!r}, this run has "
                                           f"{k} {context.get(k)!r}; use the same {k}, or another journal path")
            self.run = conn.execute("INSERT INTO runs (started, host, pid) VALUES (?, ?, ?)",
                                    (now, socket.gethostname(), os.getpid())).lastrowid
            conn.execute("COMMIT")
            if mode.lower() != "wal":
                warnings.warn(f"journal {p}: SQLite refused WAL mode (got {mode}); writes are slower",
                              JournalWarning, stacklevel=3)
            n_tasks, b_tasks = conn.execute("SELECT count(*), coalesce(sum(length(value)), 0) FROM tasks").fetchone()
            n_inbox, b_inbox = conn.execute("SELECT coalesce(sum(n), 0), coalesce(sum(length(vals)), 0) "
                                            "FROM inbox").fetchone()
            self._had_rows = n_tasks + n_inbox > 0
            self._preload = n_tasks + n_inbox <= PRELOAD_MAX_ROWS and b_tasks + b_inbox <= PRELOAD_MAX_BYTES
            if n_inbox and (not self._preload or n_inbox <= MERGE_ALWAYS):
                self._merge()  # task-by-task lookups read the tasks table only
            self._rconn = self._connect()
        except JournalError:
            self._rollback()
            raise
        except sqlite3.Error as e:
            self._rollback()
            raise JournalError(self._write_error_message(e, opening=True)) from None

    def _open_readonly(self) -> None:
        p = self.path
        if not p.is_file():
            raise JournalError(f"journal {p} does not exist" if not p.exists() else f"journal {p} is not a file")
        uri = p.absolute().as_uri()
        try:
            try:
                conn = self._rconn = self._connect(uri + "?mode=ro")
                self._check_is_sqlite(conn)
            except sqlite3.OperationalError:
                # a WAL journal in a read-only directory: no shared-memory file can be made; nobody can be
                # writing it either, so read the file as it is
                self._release()
                conn = self._rconn = self._connect(uri + "?immutable=1")
                self._check_is_sqlite(conn)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                raise JournalError(f"journal {p} holds nothing yet (an empty file: a driver may be creating it "
                                   "right now)")
            meta = self._check_meta(conn, tables)
        except JournalError:
            self._release()
            raise
        except sqlite3.Error as e:
            self._release()
            raise JournalError(f"cannot read journal {p}: {_describe(e)}") from None
        self.function = meta.get("function")

    def _check_is_sqlite(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            if "not a database" in str(e) or "malformed" in str(e):
                raise JournalError(f"{self.path} is not an ipmtc journal (not an SQLite database: {_describe(e)})"
                                   "; pick another journal path") from None
            raise

    def _check_meta(self, conn: sqlite3.Connection, tables: set[str]) -> dict[str, str]:
        p = self.path
        if "meta" not in tables:
            raise JournalError(f"{p} is an SQLite database but not an ipmtc journal (no meta table); pick another "
                               "journal path")
        meta = dict(conn.execute("SELECT name, value FROM meta"))
        if meta.get("application") != APPLICATION:
            raise JournalError(f"{p} is an SQLite database but not an ipmtc journal; pick another journal path")
        version = meta.get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise JournalError(f"journal {p} was written in journal format version {version} (by ipmtc "
                               f"{meta.get('ipmtc_version', '?')}); this ipmtc reads version {SCHEMA_VERSION} only: "
                               "use the ipmtc version that wrote it, or a new journal path")
        if not {"tasks", "runs", "inbox"} <= tables:
            raise JournalError(f"journal {p} is damaged (tables missing); use a new journal path")
        return meta

    def _write_error_message(self, e: BaseException, opening: bool) -> str:
        text = _describe(e)
        low = text.lower()
        if "readonly" in low or "read-only" in low or "unable to open" in low or "permission" in low:
            why = "the file or its directory is read-only"
        elif "full" in low:
            why = "the disk (or quota) is full"
        else:
            why = "an I/O error"
        if opening:
            return (f"cannot write journal {self.path} ({why}: {text}); nothing was run: make it writable or pick "
                    "another journal path")
        return (f"journal {self.path} could not be written ({why}: {text}) after {self.n_recorded} tasks were "
                "recorded by this run; the map went on and its results are returned, but the tasks it finished "
                "since then are not recorded: a rerun runs them again")

    def _rollback(self) -> None:
        try:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # ------------------------------------------------------------ the dispatcher's side

    def lookup(self, key: str) -> tuple[Any, dict[str, Any]] | None:
        """``(value, stored)`` of a finished task, or None if it must run.

        A failed task is a hit (it stays failed) unless the journal was opened
        with ``retry_failed=True``. Only tasks recorded before this journal was
        opened are found.
        """
        if not self._had_rows:
            return None
        if self._preload:
            if self._index is None:
                self._index = self._load_index()
            ent = self._index.get(key)
            if ent is None:
                return None
            *fields, blob = ent
        else:
            rows = self._reader().execute(
                "SELECT outcome, attempts, engine_id, host, pid, started, finished, error, value FROM tasks "
                "WHERE key = ?", (key,)).fetchall()
            if not rows:
                return None
            *fields, blob = rows[0]
        stored = dict(zip(_STORED, fields))
        if stored["outcome"] != "ok":
            if self.retry_failed:
                return None
            self.hits_failed += 1
            self.hit_keys.add(key)
            return None, stored
        try:
            value = pickle.loads(blob)
        except Exception as e:  # e.g. the result's class moved or is gone: compute it again
            if not self._warned_unpickle:
                self._warned_unpickle = True
                warnings.warn(f"journal {self.path}: a stored result cannot be unpickled ({type(e).__name__}: "
                              f"{e}); such tasks run again", JournalWarning, stacklevel=2)
            return None
        self.hits_ok += 1
        self.hit_keys.add(key)
        return value, stored

    def _load_index(self) -> dict[str, tuple]:
        """Every stored task at once (two queries): key -> (outcome, ..., error, pickled result)."""
        index = {row[0]: row[1:] for row in self._reader().execute(
            "SELECT key, outcome, attempts, engine_id, host, pid, started, finished, error, value FROM tasks")}
        for run, recorded, rblob, vblob in self._reader().execute(
                "SELECT run, recorded, rows, vals FROM inbox ORDER BY seq"):
            for row in _task_rows(rblob, vblob, run, recorded):
                # (key, idx, outcome, attempts, resubmits, engine_id, host, pid, started, finished, error, value, ..)
                index[row[0]] = (row[2], row[3], row[5], row[6], row[7], row[8], row[9], row[10], row[11])
        return index

    @property
    def has_records(self) -> bool:
        """Whether tasks were recorded before this journal was opened (else no lookup can hit)."""
        return self._had_rows

    def add(self, rec, value: Any, item: Any = None, key_of: Callable[[Any], str] | None = None) -> None:
        """Record a finished task (``rec`` a :class:`~ipmtc.maps.result.TaskRecord`, ``value`` None if it failed).

        Cheap: the record is queued; the background writer commits it within
        ``flush_interval_s``. The record must not change afterwards (the
        dispatcher never touches a finished task's record again). A record
        without a key gets ``key_of(item)`` from the writer (off the map's path:
        a map over a new journal looks nothing up, so it needs no key up front).
        """
        if not self._accepting(1):
            return
        if rec.key is None:
            self._items.append((item, key_of))
        self._records.append(rec)
        q = self._values
        q.append(value)
        n = len(q)
        if n == self.batch:  # once per batch: Event.set() costs more than the rest of add()
            self._wake.set()
        elif n >= MAX_PENDING:  # the writer lags far behind: write here (back-pressure)
            self._write_pending()

    def add_chunk(self, pickled_rows: bytes, n: int, engine_id: int | None, host: str, pid: int,
                  skip: list[int], overrides: dict[int, tuple[int, int]]) -> None:
        """Record the ok tasks of one chunk as the engine pickled them (``runner._for_journal``).

        ``pickled_rows`` holds (key, index, started, finished, result) per task;
        ``skip``: indices not to record (duplicates); ``overrides``: index -> (attempts,
        resubmits) where not (1, 0). Stored as one inbox row, so a map with a journal does
        no per-task work for it here.
        """
        if not self._accepting(n):
            return
        head = {"chunk": 1, "engine_id": engine_id, "host": host, "pid": pid, "skip": skip, "over": overrides}
        self._chunks.append((head, pickled_rows, n))
        self._chunk_tasks += n
        if self._chunk_tasks >= self.batch:
            self._chunk_tasks = 0
            self._wake.set()

    def _accepting(self, n: int) -> bool:
        """False (the ``n`` tasks counted as unrecorded) once writing failed; raises if closed/read-only."""
        if self._closed or self.readonly:
            raise JournalError(f"journal {self.path} is {'closed' if self._closed else 'open read-only'}; "
                               "cannot record tasks")
        if self.error is not None:
            self.n_unrecorded += n
            self._report()
            return False
        return True

    def flush(self) -> None:
        """Commit everything queued now. Never raises for a failed write: see :attr:`error`."""
        if self._closed or self.readonly:
            return
        self._write_pending()
        self._report()

    def check_function(self, fn: Callable) -> None:
        """Raise :class:`JournalError` unless this journal was opened for a map of ``fn``."""
        fid = function_id(fn)
        if self.function != fid:
            raise JournalError(f"journal {self.path} belongs to a map of {self.function}, not of {fid}; results of "
                               "different functions are never mixed: use another journal path (or delete this one)")

    def check(self) -> None:
        """Raise :attr:`error` if recording failed during the map."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Commit what is queued, release the lock. Idempotent; never raises for a failed write."""
        if self._closed:
            return
        if not self.readonly:
            self._stopping = True
            self._wake.set()
            if self._thread is not None:
                self._thread.join()
            self._write_pending()  # (also sets runs.ended)
            if self.error is None and self._conn is not None:
                try:
                    # fold the batches into the tasks table, unless that would add noticeably to a very
                    # short map's time (a later open or close does it then)
                    pending = self._conn.execute("SELECT coalesce(sum(n), 0) FROM inbox").fetchone()[0]
                    elapsed = time.monotonic() - self._opened_at
                    if pending <= MERGE_ALWAYS or pending * MERGE_COST_S <= MERGE_SHARE * elapsed:
                        self._merge()
                    if not self.n_recorded:
                        self._conn.execute("UPDATE runs SET ended = ? WHERE run = ?", (time.time(), self.run))
                except sqlite3.Error:
                    pass  # recorded batches stay in the inbox; the next open folds them in
            self._report()
        self._closed = True
        self._index = None
        self._release()

    def _release(self) -> None:
        for conn in (self._rconn, self._conn):
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
        self._rconn = self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._closed:
                return
            if sys.is_finalizing():  # too late for threads and commits: at least let go of the lock
                self._release()
            else:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self.readonly else "open")
        return f"<Journal {str(self.path)!r} of {self.function} ({state})>"

    # ------------------------------------------------------------ writing

    def _writer(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._write_pending()
            except Exception as e:  # never die silently: the map goes on, the error is reported
                if self.error is None:
                    self.error = e if isinstance(e, JournalError) else \
                        JournalError(self._write_error_message(e, opening=False))
            if stopping:
                return

    def _write_pending(self) -> None:
        """Commit the queued records as one inbox batch and each queued chunk as one more (one transaction)."""
        with self._wmu:
            n = len(self._values)
            chunks = [self._chunks.popleft() for _ in range(len(self._chunks))]
            if not n and not chunks:
                return
            pop_r, pop_v = self._records.popleft, self._values.popleft
            recs = [pop_r() for _ in range(n)]
            if self._items:
                pop_i = self._items.popleft
                for rec in recs:
                    if rec.key is None:
                        item, key_of = pop_i()
                        rec.key = key_of(item)
            rows = list(map(_RECORD_ROW, recs))
            values = [pop_v() for _ in range(n)]
            in_chunks = sum(c[2] for c in chunks)
            if self.error is not None:
                self.n_unrecorded += n + in_chunks
                return
            # each result pickled on its own (a lookup or the fold never has to unpickle the others)
            dumps, proto = pickle.dumps, pickle.HIGHEST_PROTOCOL
            try:
                blobs = [dumps(v, protocol=proto) if row[2] == "ok" else None for row, v in zip(rows, values)]
            except Exception:  # some result cannot be pickled: record the others
                rows, blobs = self._picklable(rows, values)
            batches = [(len(rows), dumps(rows, protocol=proto), dumps(blobs, protocol=proto))] if rows else []
            batches += [(k, dumps(head, protocol=proto), blob) for head, blob, k in chunks]
            if not batches:
                return
            total = len(rows) + in_chunks
            now = time.time()
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO inbox (run, recorded, n, rows, vals) VALUES (?, ?, ?, ?, ?)",
                                 [(self.run, now, k, rblob, vblob) for k, rblob, vblob in batches])
                conn.execute("UPDATE runs SET recorded = recorded + ?, ended = ? WHERE run = ?",
                             (total, now, self.run))
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                self.n_unrecorded += total
                self.error = JournalError(self._write_error_message(e, opening=False))
                return
            self.n_recorded += total

    def _picklable(self, rows: list, values: list) -> tuple[list, list]:
        keep_rows, blobs = [], []
        for row, v in zip(rows, values):
            try:
                blob = pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL) if row[2] == "ok" else None
            except Exception as e:
                self.n_unrecorded += 1
                if self.pickle_problem is None:
                    self.pickle_problem = f"task {row[1]}: {type(e).__name__}: {e}"
                continue
            keep_rows.append(row)
            blobs.append(blob)
        return keep_rows, blobs

    def compact(self) -> None:
        """Fold every committed batch into the ``tasks`` table now (for queries with plain SQL)."""
        if self._closed or self.readonly:
            raise JournalError(f"journal {self.path} is {'closed' if self._closed else 'open read-only'}; "
                               "open it for writing to compact it")
        self.flush()
        try:
            self._merge()
        except sqlite3.Error as e:
            raise JournalError(self._write_error_message(e, opening=False)) from None

    def _merge(self) -> None:
        """Fold the inbox into the tasks table (one transaction: all of it or nothing, in batch order)."""
        with self._wmu:
            conn = self._conn
            seqs = [r[0] for r in conn.execute("SELECT seq FROM inbox ORDER BY seq")]
            if not seqs:
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                for seq in seqs:
                    run, recorded, rblob, vblob = conn.execute(
                        "SELECT run, recorded, rows, vals FROM inbox WHERE seq = ?", (seq,)).fetchone()
                    conn.executemany(_INSERT, _task_rows(rblob, vblob, run, recorded))
                conn.execute("DELETE FROM inbox WHERE seq <= ?", (seqs[-1],))
                conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _report(self) -> None:
        if self.error is not None and not self._reported:
            self._reported = True
            warnings.warn(str(self.error), JournalWarning, stacklevel=3)
        if self.pickle_problem and not self._pickle_reported:
            self._pickle_reported = True
            warnings.warn(f"journal {self.path}: some results cannot be pickled ({self.pickle_problem}); they are "
                          "not recorded and will be computed again on a rerun", JournalWarning, stacklevel=3)

    # ------------------------------------------------------------ reading (ipmtc journal show)

    def _reader(self) -> sqlite3.Connection:
        if self._rconn is None:
            raise JournalError(f"journal {self.path} is closed")
        return self._rconn

    def meta(self) -> dict[str, str]:
        return dict(self._reader().execute("SELECT name, value FROM meta"))

    def runs(self) -> list[dict[str, Any]]:
        cur = self._reader().execute("SELECT run, started, ended, host, pid, recorded FROM runs ORDER BY run")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def _inbox(self, values: bool) -> dict[str, tuple]:
        """Committed records not merged yet: key -> full task row (the latest batch wins)."""
        latest: dict[str, tuple] = {}
        for run, recorded, rblob, vblob in self._reader().execute(
                "SELECT run, recorded, rows, vals FROM inbox ORDER BY seq"):
            for row in _task_rows(rblob, vblob, run, recorded, values):
                latest[row[0]] = row
        return latest

    def counts(self) -> dict[str, int]:
        """Recorded tasks by outcome."""
        conn = self._reader()
        counts = dict(conn.execute("SELECT outcome, count(*) FROM tasks GROUP BY outcome"))
        inbox = self._inbox(values=False)
        if inbox:
            keys = list(inbox)
            for i in range(0, len(keys), 500):  # rows the inbox replaces
                part = keys[i:i + 500]
                for (outcome,) in conn.execute(
                        f"SELECT outcome FROM tasks WHERE key IN ({','.join('?' * len(part))})", part):
                    counts[outcome] -= 1
            for row in inbox.values():
                counts[row[2]] = counts.get(row[2], 0) + 1
        return {k: v for k, v in sorted(counts.items()) if v}

    def rows(self, *, failed_only: bool = False, values: bool = False) -> Iterator[dict[str, Any]]:
        """Every recorded task as a dict (by run, then input position); optionally only failed ones, with results."""
        inbox = self._inbox(values=values)
        cols = [c if values or c != "value" else "NULL" for c in _COLUMNS]
        sql = f"SELECT {', '.join(cols)} FROM tasks"
        if failed_only:
            sql += " WHERE outcome != 'ok'"
        sql += " ORDER BY run, idx"
        for r in self._reader().execute(sql):
            if r[0] not in inbox:
                yield self._as_dict(r, values)
        for r in sorted(inbox.values(), key=lambda r: (r[12] or 0, r[1] if r[1] is not None else -1)):
            if not failed_only or r[2] != "ok":
                yield self._as_dict(r, values)

    @staticmethod
    def _as_dict(r: tuple, values: bool) -> dict[str, Any]:
        d = dict(zip(_COLUMNS, r))
        if values:
            d["value"] = _unpickle_for_show(d["value"], d["outcome"])
        else:
            d.pop("value")
        return d


def _task_rows(rblob: bytes, vblob: bytes | None, run: int, recorded: float, values: bool = True) -> list[tuple]:
    """Rows of the tasks table from one inbox batch.

    A batch is either the driver's (a list of plain tuples and a list of pickled
    results) or a chunk as the engine pickled it (a header, and (key, index,
    started, finished, result) per task: see :meth:`Journal.add_chunk`); its
    results are pickled one by one here, as the tasks table stores them.
    """
    rows = pickle.loads(rblob)
    if type(rows) is dict:
        skip, over = set(rows["skip"]), rows["over"]
        eid, host, pid = rows["engine_id"], rows["host"], rows["pid"]
        dumps, proto = pickle.dumps, pickle.HIGHEST_PROTOCOL
        return [(key, idx, "ok", *over.get(idx, (1, 0)), eid, host, pid, started, finished, None,
                 dumps(value, protocol=proto) if values else None, run, recorded)
                for key, idx, started, finished, value in pickle.loads(vblob) if idx not in skip]
    if vblob is None or not values:
        return [row + (None, run, recorded) for row in rows]
    return [row + (blob, run, recorded) for row, blob in zip(rows, pickle.loads(vblob))]


def _unpickle_for_show(blob: bytes | None, outcome: str) -> Any:
    if blob is None or outcome != "ok":
        return None
    try:
        return pickle.loads(blob)
    except Exception as e:
        return f"<result cannot be unpickled here: {type(e).__name__}: {e}>"


def _ipmtc_version() -> str:
    try:
        from . import __version__

        return __version__
    except Exception:
        return "?"


__all__ = ["Journal", "JournalWarning", "SCHEMA_VERSION", "function_id", "key_for", "key_function", "task_key"]
