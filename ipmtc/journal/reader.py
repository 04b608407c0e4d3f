"""Reading a journal: the dispatcher's lookups, and the queries of ``ipmtc journal show`` and ``ipmtc report``.

Every reader sees both tables, the ``tasks`` table and the batches still in the
``inbox`` (:func:`_task_rows` turns a batch into rows of the tasks table), the
newest record of a key winning.
"""
from __future__ import annotations

import pickle
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from ..errors import JournalWarning
from ..keys import unpack_keys
from ..outcomes import OK
from . import inbox
from .store import _COLUMNS, Contents, Store

PRELOAD_MAX_ROWS = 2_000_000  # lookups read the whole journal into memory at once up to this size,
PRELOAD_MAX_BYTES = 256 << 20  # (bytes of stored results); larger journals are queried task by task

_STORED = ("outcome", "attempts", "engine_id", "host", "pid", "started", "finished", "error")

Row = tuple[Any, ...]


def _task_rows(rblob: bytes, vblob: bytes | None, run: int, recorded: float, values: bool = True) -> list[Row]:
    """Rows of the tasks table from one inbox batch.

    A batch is either the driver's (a list of plain tuples and a list of pickled
    results) or a chunk as the engine pickled it (a header holding the tasks'
    pickled keys, and the tasks' rows (index, "ok", result, started, finished): see
    :meth:`Journal.add_chunk`); its results are pickled one by one here, as the
    tasks table stores them.
    """
    rows = pickle.loads(rblob)
    if type(rows) is dict:
        skip, over = set(rows["skip"]), rows["over"]
        eid, host, pid = rows["engine_id"], rows["host"], rows["pid"]
        dumps, proto = pickle.dumps, pickle.HIGHEST_PROTOCOL
        keys = unpack_keys(rows["keys"])
        return [(key, idx, OK, *over.get(idx, (1, 0)), eid, host, pid, started, finished, None,
                 dumps(value, protocol=proto) if values else None, run, recorded)
                for key, (idx, _, value, started, finished) in zip(keys, pickle.loads(cast(bytes, vblob)))
                if idx not in skip]
    if vblob is None or not values:
        return [row + (None, run, recorded) for row in rows]
    return [row + (blob, run, recorded) for row, blob in zip(rows, pickle.loads(vblob))]


def inbox_rows(batches: list[tuple[bytes, bytes | None]], run: int, recorded: float,
               values: bool = True) -> list[Row]:
    """Rows of the tasks table from one inbox record (one commit: its batches)."""
    out: list[Row] = []
    for rblob, vblob in batches:
        out += _task_rows(rblob, vblob, run, recorded, values)
    return out


def _unpickle_for_show(blob: bytes | None, outcome: str) -> Any:
    if blob is None or outcome != OK:
        return None
    try:
        return pickle.loads(blob)
    except Exception as e:
        return f"<result cannot be unpickled here: {type(e).__name__}: {e}>"


# ---------------------------------------------------------------- the dispatcher's lookups


class Lookups:
    """Finished tasks recorded before the journal was opened, looked up by key.

    Up to ``PRELOAD_MAX_ROWS`` records (and ``PRELOAD_MAX_BYTES`` of results) the
    whole journal is read into memory at the first lookup; larger journals are
    queried task by task (their inbox is folded in when they are opened).
    """

    def __init__(self, store: Store, retry_failed: bool) -> None:
        self.store = store
        self.retry_failed = retry_failed
        self.hits_ok = 0
        self.hits_failed = 0
        self.hit_keys: set[str] = set()
        self.had_rows = False  # whether anything was recorded before (else no lookup can hit)
        self.preload = True
        self._index: dict[str, Row] | None = None  # key -> stored task, read at the first lookup
        self._warned_unpickle = False

    def size_up(self, contents: Contents) -> None:
        """Choose how to look tasks up, from what the journal held when it was opened."""
        self.had_rows = contents.records > 0
        self.preload = contents.records <= PRELOAD_MAX_ROWS and contents.value_bytes <= PRELOAD_MAX_BYTES

    def forget(self) -> None:
        self._index = None

    def lookup(self, key: str) -> tuple[Any, dict[str, Any]] | None:
        """``(value, stored)`` of a finished task, or None if it must run (see :meth:`Journal.lookup`)."""
        if not self.had_rows:
            return None
        if self.preload:
            if self._index is None:
                self._index = self._load_index()
            ent = self._index.get(key)
            if ent is None:
                return None
            *fields, blob = ent
        else:
            rows = self.store.reader().execute(
                "SELECT outcome, attempts, engine_id, host, pid, started, finished, error, value FROM tasks "
                "WHERE key = ?", (key,)).fetchall()
            if not rows:
                return None
            *fields, blob = rows[0]
        stored = dict(zip(_STORED, fields))
        if stored["outcome"] != OK:
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
                warnings.warn(f"journal {self.store.path}: a stored result cannot be unpickled "
                              f"({type(e).__name__}: {e}); such tasks run again", JournalWarning, stacklevel=3)
            return None
        self.hits_ok += 1
        self.hit_keys.add(key)
        return value, stored

    def _load_index(self) -> dict[str, Row]:
        """Every stored task at once (two queries): key -> (outcome, ..., error, pickled result)."""
        conn = self.store.reader()
        index = {row[0]: row[1:] for row in conn.execute(
            "SELECT key, outcome, attempts, engine_id, host, pid, started, finished, error, value FROM tasks")}
        for run, recorded, _, batches in inbox.records(self.store.inbox_path):
            for row in inbox_rows(batches, run, recorded):
                # (key, idx, outcome, attempts, resubmits, engine_id, host, pid, started, finished, error, value, ..)
                index[row[0]] = (row[2], row[3], row[5], row[6], row[7], row[8], row[9], row[10], row[11])
        return index


# ---------------------------------------------------------------- queries (ipmtc journal show, report)


def meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT name, value FROM meta"))


def runs(conn: sqlite3.Connection, inbox_path: Path) -> list[dict[str, Any]]:
    """The drivers that opened the journal: run, started, host, pid, and what each recorded (``recorded``
    tasks, the last commit ``ended``; worked out here so that no commit has to update the runs table)."""
    cur = conn.execute("SELECT run, started, host, pid FROM runs ORDER BY run")
    cols = [d[0] for d in cur.description]
    out = [dict(zip(cols, r), recorded=0, ended=None) for r in cur.fetchall()]
    by_run = {r["run"]: r for r in out}
    for run, n, last in [*conn.execute("SELECT run, count(*), max(recorded) FROM tasks GROUP BY run"),
                         *((run, n, rec) for run, rec, n, _ in inbox.records(inbox_path))]:
        if run in by_run:
            r = by_run[run]
            r["recorded"] += n
            r["ended"] = max(r["ended"] or 0.0, last or 0.0) or None
    return out


def _inbox(inbox_path: Path, values: bool) -> dict[str, Row]:
    """Committed records not folded yet: key -> full task row (the latest batch wins)."""
    latest: dict[str, Row] = {}
    for run, recorded, _, batches in inbox.records(inbox_path):
        for row in inbox_rows(batches, run, recorded, values):
            latest[row[0]] = row
    return latest


def counts(conn: sqlite3.Connection, inbox_path: Path) -> dict[str, int]:
    """Recorded tasks by outcome."""
    by_outcome: dict[str, int] = dict(conn.execute("SELECT outcome, count(*) FROM tasks GROUP BY outcome"))
    unfolded = _inbox(inbox_path, values=False)
    if unfolded:
        keys = list(unfolded)
        for i in range(0, len(keys), 500):  # rows the inbox replaces
            part = keys[i:i + 500]
            for (outcome,) in conn.execute(
                    f"SELECT outcome FROM tasks WHERE key IN ({','.join('?' * len(part))})", part):
                by_outcome[outcome] -= 1
        for row in unfolded.values():
            by_outcome[row[2]] = by_outcome.get(row[2], 0) + 1
    return {k: v for k, v in sorted(by_outcome.items()) if v}


def rows(conn: sqlite3.Connection, inbox_path: Path, *, failed_only: bool = False,
         values: bool = False) -> Iterator[dict[str, Any]]:
    """Every recorded task as a dict (by run, then input position); optionally only failed ones, with results."""
    unfolded = _inbox(inbox_path, values=values)
    cols = [c if values or c != "value" else "NULL" for c in _COLUMNS]
    sql = f"SELECT {', '.join(cols)} FROM tasks"
    params: tuple[str, ...] = ()
    if failed_only:
        sql += " WHERE outcome != ?"
        params = (OK,)
    sql += " ORDER BY run, idx"
    for r in conn.execute(sql, params):
        if r[0] not in unfolded:
            yield _as_dict(r, values)
    for r in sorted(unfolded.values(), key=lambda r: (r[12] or 0, r[1] if r[1] is not None else -1)):
        if not failed_only or r[2] != OK:
            yield _as_dict(r, values)


def _as_dict(r: Row, values: bool) -> dict[str, Any]:
    d = dict(zip(_COLUMNS, r))
    if values:
        d["value"] = _unpickle_for_show(d["value"], d["outcome"])
    else:
        d.pop("value")
    return d
