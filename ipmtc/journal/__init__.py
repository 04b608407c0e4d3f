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
    The driver's background thread commits finished tasks whenever it is idle
    (group commit: what arrived during one commit goes in the next), so a
    result the driver received is durable within about one commit's time: each
    commit is one SQL statement appending one row to the ``inbox`` table (WAL
    mode, ``synchronous=FULL``). With the default key, the engines do the
    per-task work: each chunk comes back with its tasks' keys and rows in two
    pickles, stored as they are (plus a small header: engine, host, pid,
    attempts where not 1, duplicates to skip), so the driver does no per-task
    journal work; short inputs (ints, floats, short tuples...) are their own
    keys, spelled out only when the journal is read (:mod:`ipmtc.keys`).
    Other records (a user's ``key=``, failures, results plain pickle cannot
    take) go as one batch per commit (records as one pickled list of plain
    tuples, results each pickled on its own; their keys worked out by the
    writer thread when the journal held nothing to look up). A new journal's
    file is created private (0600, ``O_EXCL|O_NOFOLLOW``) at once, and set up
    by the writer thread while the map starts; its last connection is closed
    (the WAL checkpoint) by a thread of its own after every commit is durable.
    The ``inbox`` is folded into the ``tasks`` table (one
    row per task, the key its primary key, the result pickled) in one
    transaction when the journal is closed (unless that would add more than 5%
    to a very short map; the next open or a later close does it then, or
    :meth:`Journal.compact`). Every
    reader here (lookups, ``ipmtc journal show``, :meth:`Journal.rows`) sees
    both tables, the newest record of a key winning.

    A task is *recorded* once its batch is committed. If the driver dies at
    any moment (SIGKILL included), every recorded task survives and is never
    run again; only tasks still on the engines, or whose results arrived during
    the last commit, run again. No task is recorded twice: the key is the ``tasks`` table's
    primary key, the fold deletes the inbox rows it folded in the same
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

Layout
    :mod:`.api`: :class:`Journal`, the one public class, a facade over the parts below;
    :mod:`.store`: the file (schema, creating, opening, checking it), its lock and connections;
    :mod:`.writer`: the queues, the background thread's batched commits, the fold into ``tasks``;
    :mod:`.reader`: lookups for the dispatcher, queries for ``ipmtc journal show`` and ``report``.
"""
from __future__ import annotations

from ..errors import JournalError, JournalWarning  # noqa: F401 (JournalError: importable from here too)
from ..keys import (  # noqa: F401 (API)
    function_id,
    key_for,
    key_function,
    key_prefix,
    keys_for,
    pack_keys,
    task_key,
    unpack_keys,
)
from .api import Journal

# the single-module journal's other names, still importable from here (monkeypatching them here changes
# nothing: patch the module that uses them)
from .reader import _STORED, PRELOAD_MAX_BYTES, PRELOAD_MAX_ROWS, _task_rows, _unpickle_for_show  # noqa: F401
from .store import (  # noqa: F401
    _COLUMNS,
    _INSERT,
    _SCHEMA,
    APPLICATION,
    SCHEMA_VERSION,
    _describe,
    _ipmtc_version,
    _lock_holder,
)
from .writer import (  # noqa: F401
    _RECORD_ROW,
    BATCH,
    FLUSH_INTERVAL_S,
    MAX_PENDING,
    MERGE_ALWAYS,
    MERGE_COST_S,
    MERGE_SHARE,
)

__all__ = ["Journal", "JournalWarning", "SCHEMA_VERSION", "function_id", "key_for", "key_function", "task_key"]
