"""The journal file: its schema, creating, opening and checking it, the driver's lock, its connections.

Everything here is about the files themselves: which SQLite tables the journal
holds, whether a file is a journal this version can use (and of the same function
and context), the ``flock`` on ``<journal>.lock`` that lets one driver own it, its
inbox (:mod:`.inbox`), the two connections (writer and reader, opened when first
needed) and the one-line messages for a file that cannot be used. What goes into
the tables is :mod:`.writer`'s business, what comes out :mod:`.reader`'s.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sqlite3
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .._private import check_owned, create_private
from ..errors import JournalError, JournalWarning, SecurityError
from . import inbox
from .inbox import Inbox

SCHEMA_VERSION = 2  # 2: short inputs keyed as they are (keys.py); the inbox a file of its own (inbox.py)
APPLICATION = "ipmtc-journal"

# stored as it is in sqlite_master: keep the text unchanged within a SCHEMA_VERSION
_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (run INTEGER PRIMARY KEY, started REAL NOT NULL, host TEXT, pid INTEGER);
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
"""
_COLUMNS = ("key", "idx", "outcome", "attempts", "resubmits", "engine_id", "host", "pid", "started",
            "finished", "error", "value", "run", "recorded")
_INSERT = f"INSERT OR REPLACE INTO tasks ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


@dataclass(frozen=True)
class Contents:
    """What a journal held when it was opened for writing."""

    records: int  # records in the tasks table and the inbox together
    value_bytes: int  # bytes of stored results (both)
    inbox: int  # records in the inbox (not folded into the tasks table yet)


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


def _ipmtc_version() -> str:
    try:
        from .. import __version__

        return __version__
    except Exception:
        return "?"


def foreign_function(path: Path, theirs: str | None, ours: str | None) -> JournalError:
    """The error for a journal of another function than the map's."""
    return JournalError(f"journal {path} belongs to a map of {theirs}, not of {ours}; results of different "
                        "functions are never mixed: use another journal path (or delete this one)")


def _close(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


def _finish(box: Inbox | None, conn: sqlite3.Connection | None) -> None:
    """A released journal's last steps: the inbox synced and closed, the writer's connection closed."""
    if box is not None:
        try:
            box.sync()
        except OSError:
            pass  # in the kernel already: only a node crash could lose it
        box.close()
    if conn is not None:
        _close(conn)


class Store:
    """One journal file: its lock, its connections, and the checks that let a map use it.

    ``conn`` is the writer's connection (the background thread, flushes, folds;
    one at a time under ``write_lock``), ``rconn`` the reader's (lookups, queries).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.function: str | None = None  # function_id of the map it belongs to
        self.run: int | None = None  # runs.run of this driver (opened for writing)
        self.conn: sqlite3.Connection | None = None
        self.rconn: sqlite3.Connection | None = None
        self.lock_fd: int | None = None
        self.inbox_path = inbox.inbox_path(path)
        self.inbox: Inbox | None = None  # open for appending while this driver holds the lock
        self.writable = False  # opened for writing and not released: connections may be opened
        # one writer at a time on conn; release() waits for a commit in flight (reentrant: a release from
        # a garbage collection in the middle of a write in the same thread must not deadlock)
        self.write_lock = threading.RLock()

    # ------------------------------------------------------------ the lock

    def lock(self) -> None:
        """Take the exclusive ``flock`` on ``<journal>.lock`` (and say who holds it, for other drivers)."""
        p = self.path
        if p.is_dir():
            raise JournalError(f"journal {p} is a directory; give the path of a file (e.g. {p}/run.db)")
        if not p.parent.is_dir():
            raise JournalError(f"cannot create journal {p}: directory {p.parent} does not exist")
        lock_path = Path(f"{p}.lock")
        try:
            fd = create_private(lock_path)  # (it says who holds it)
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
        self.lock_fd = fd
        try:  # who holds it, for the message another driver gets
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.time()}).encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        """Close both connections and the inbox, let go of the lock. Never commits; idempotent.

        Waits for a commit in flight (the background thread's), never starts one.
        """
        with self.write_lock:
            self.writable = False
            if self.rconn is not None:
                _close(self.rconn)  # not the last connection: quick
            wconn, box, self.rconn, self.conn, self.inbox = self.conn, self.inbox, None, None, None
        if wconn is not None or box is not None:
            # the inbox's fsync and the last connection's close (a WAL checkpoint) take a few ms at the end
            # of every map that nothing waits on: what was committed is in the kernel already, and nothing
            # else can reach these any more, so a thread of their own finishes them (joined at exit)
            threading.Thread(target=_finish, args=(box, wconn), name=f"ipmtc-journal-close-{self.path.name}").start()
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = None

    def create_new(self, context: dict[str, str]) -> bool:
        """Create the journal if there is no file at its path: True if this call made it.

        The file is written whole from an image built in memory (schema, meta, this
        driver's run; WAL mode), private from the first byte (0600, ``O_EXCL``,
        ``O_NOFOLLOW``): no SQLite connection to the file and no fsync on the map's
        path (:meth:`sync_new` does that later). SQLite makes the ``-wal`` and
        ``-shm`` files with this file's mode. Call with the lock held.
        """
        if not hasattr(sqlite3.Connection, "serialize"):  # Python < 3.11: open_rw creates it
            return False
        image = self._image(context)
        try:
            fd = create_private(self.path, os.O_WRONLY | os.O_EXCL)
        except FileExistsError:
            return False
        except OSError as e:
            raise JournalError(self.write_error_message(e, opening=True)) from None
        try:
            os.write(fd, image)
        except OSError as e:
            os.close(fd)
            os.unlink(self.path)
            raise JournalError(self.write_error_message(e, opening=True)) from None
        os.close(fd)
        self.run = 1
        self.writable = True
        return True

    def _image(self, context: dict[str, str]) -> bytes:
        conn = sqlite3.connect(":memory:", isolation_level=None)
        try:
            now = time.time()
            self._create(conn, context, now)
            conn.execute("INSERT INTO runs (run, started, host, pid) VALUES (1, ?, ?, ?)",
                         (now, socket.gethostname(), os.getpid()))
            image = bytearray(conn.serialize())  # type: ignore[attr-defined]  # 3.11+: create_new checks
        finally:
            conn.close()
        image[18] = image[19] = 2  # the file format's read and write versions: 2 is WAL mode
        return bytes(image)

    def sync_new(self) -> None:
        """fsync a file :meth:`create_new` made, and its directory (the writer thread's first job)."""
        for path, flags in ((self.path, os.O_RDONLY), (self.path.parent, os.O_RDONLY | os.O_DIRECTORY)):
            fd = os.open(path, flags | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def check_ours(self) -> None:
        """Refuse a journal (or its inbox) someone else owns or may write: ipmtc unpickles what is in it,
        and a pickle can run any code."""
        for path in (self.path, self.inbox_path):
            try:
                check_owned(path)
            except FileNotFoundError:
                continue
            except SecurityError as e:
                raise JournalError(f"journal {e}") from None

    def open_inbox(self) -> None:
        """Open the inbox for appending (cutting off a record a crash cut short). Call with the lock held."""
        try:
            self.inbox = Inbox(self.inbox_path)
        except OSError as e:
            raise JournalError(self.write_error_message(e, opening=True)) from None

    # ------------------------------------------------------------ connections

    def connect(self, uri: str | None = None) -> sqlite3.Connection:
        return sqlite3.connect(uri if uri is not None else str(self.path), uri=uri is not None,
                               isolation_level=None, check_same_thread=False, timeout=10.0)

    def writer(self) -> sqlite3.Connection:
        """The writer's connection (held under ``write_lock``; opened when first needed)."""
        if self.conn is None:
            if not self.writable:
                raise JournalError(f"journal {self.path} is closed")
            self.conn = self._connect_rw()
        return self.conn

    def reader(self) -> sqlite3.Connection:
        """The reader's connection (opened when first needed)."""
        if self.rconn is None:
            if not self.writable:
                raise JournalError(f"journal {self.path} is closed")
            self.rconn = self._connect_rw()
        return self.rconn

    def _connect_rw(self) -> sqlite3.Connection:
        try:
            conn = self.connect()
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as e:
            raise JournalError(self.write_error_message(e, opening=False)) from None
        return conn

    def rollback(self) -> None:
        try:
            if self.conn is not None and self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # ------------------------------------------------------------ opening

    def open_rw(self, context: dict[str, str]) -> Contents:
        """Open (or create) the file for writing, check that it is this map's, start this driver's run.

        Call with the lock held and ``function`` set. WAL mode, ``synchronous=FULL``.
        """
        p = self.path
        self.check_ours()
        try:
            conn = self.conn = self.connect()
            self._check_is_sqlite(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            now = time.time()
            if not tables:
                self._create(conn, context, now)
            else:
                self._check_identity(conn, tables, context)
            self.run = conn.execute("INSERT INTO runs (started, host, pid) VALUES (?, ?, ?)",
                                    (now, socket.gethostname(), os.getpid())).lastrowid
            conn.execute("COMMIT")
            if mode.lower() != "wal":
                warnings.warn(f"journal {p}: SQLite refused WAL mode (got {mode}); writes are slower",
                              JournalWarning, stacklevel=3)
            n_tasks, b_tasks = conn.execute("SELECT count(*), coalesce(sum(length(value)), 0) FROM tasks").fetchone()
            n_inbox, b_inbox = inbox.size(self.inbox_path)
        except JournalError:
            self.rollback()
            raise
        except sqlite3.Error as e:
            self.rollback()
            raise JournalError(self.write_error_message(e, opening=True)) from None
        self.writable = True
        return Contents(records=n_tasks + n_inbox, value_bytes=b_tasks + b_inbox, inbox=n_inbox)

    def _create(self, conn: sqlite3.Connection, context: dict[str, str], now: float) -> None:
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", [
            ("application", APPLICATION), ("schema_version", str(SCHEMA_VERSION)),
            ("function", self.function), ("context", json.dumps(context, sort_keys=True)),
            ("created", repr(now)), ("ipmtc_version", _ipmtc_version())])

    def _check_identity(self, conn: sqlite3.Connection, tables: set[str], context: dict[str, str]) -> None:
        """Refuse a journal of another function or context (or not a journal this version reads)."""
        meta = self._check_meta(conn, tables)
        theirs = meta.get("function")
        if theirs != self.function:
            raise foreign_function(self.path, theirs, self.function)
        stored = json.loads(meta.get("context") or "{}")
        for k in sorted(set(stored) | set(context)):
            if stored.get(k) != context.get(k):
                raise JournalError(f"journal {self.path} was written with {k} {stored.get(k)!r}, this run has "
                                   f"{k} {context.get(k)!r}; use the same {k}, or another journal path")

    def open_readonly(self) -> None:
        """Open an existing journal for inspection only (no lock; works while a driver writes it)."""
        p = self.path
        if not p.is_file():
            raise JournalError(f"journal {p} does not exist" if not p.exists() else f"journal {p} is not a file")
        self.check_ours()
        uri = p.absolute().as_uri()
        try:
            try:
                conn = self.rconn = self.connect(uri + "?mode=ro")
                self._check_is_sqlite(conn)
            except sqlite3.OperationalError:
                # a WAL journal in a read-only directory: no shared-memory file can be made; nobody can be
                # writing it either, so read the file as it is
                self.release()
                conn = self.rconn = self.connect(uri + "?immutable=1")
                self._check_is_sqlite(conn)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                raise JournalError(f"journal {p} holds nothing yet (an empty file: a driver may be creating it "
                                   "right now)")
            meta = self._check_meta(conn, tables)
        except JournalError:
            self.release()
            raise
        except sqlite3.Error as e:
            self.release()
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
        if not {"tasks", "runs"} <= tables:
            raise JournalError(f"journal {p} is damaged (tables missing); use a new journal path")
        return meta

    # ------------------------------------------------------------ messages

    def write_error_message(self, e: BaseException, *, opening: bool, recorded: int = 0) -> str:
        """One line for a failed write: at open (nothing ran) or during a map (``recorded`` tasks made it)."""
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
        return (f"journal {self.path} could not be written ({why}: {text}) after {recorded} tasks were "
                "recorded by this run; the map went on and its results are returned, but the tasks it finished "
                "since then are not recorded: a rerun runs them again")
