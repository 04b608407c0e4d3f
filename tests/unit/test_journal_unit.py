"""The task journal and the command-file helpers without a cluster: keys, storage, bad input, crashes.

Records are real :class:`TaskRecord` objects fed to :meth:`Journal.add` the way
the dispatcher does. Crash, lock and full-disk cases use real subprocesses
(SIGKILL, flock, RLIMIT_FSIZE); as root, the read-only case drops the capabilities
that let root write anywhere (``setpriv``).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest
from click.testing import CliRunner

from ipmtc import commands
from ipmtc import journal as J
from ipmtc.cli import main as cli_main
from ipmtc.commands import (
    CommandFailed,
    CommandWalltime,
    TaskFileError,
    _group_members,
    command_key,
    read_task_file,
    run_command,
)
from ipmtc.errors import IpmtcError, JournalError
from ipmtc.journal import Journal, JournalWarning, function_id, key_for, key_function, task_key
from ipmtc.journal import inbox as journal_inbox
from ipmtc.journal import reader as journal_reader
from ipmtc.journal import writer as journal_writer
from ipmtc.maps.result import TaskRecord


def square(x):
    return x * x


def cube(x):
    return x ** 3


class Pow:
    def __call__(self, x):
        return x


def main_square(x):
    return x * x


main_square.__module__, main_square.__qualname__ = "__main__", "square"  # what a script's square() is


def unfolded(db) -> int:
    """Tasks in the journal's inbox file (committed, not folded into the tasks table)."""
    return journal_inbox.size(journal_inbox.inbox_path(Path(db)))[0]


def rec(i: int, fn=square, outcome: str = "ok", error: str | None = None, key: str | None = None) -> TaskRecord:
    now = time.time()
    return TaskRecord(index=i, key=key or task_key(fn, i), engine_id=i % 4, host="node1", pid=1000 + i,
                      submitted=now, started=now, finished=now + 0.01, attempts=1, outcome=outcome, error=error)


def fill(j: Journal, n: int, fn=square, fail_every: int = 0, start: int = 0) -> None:
    for i in range(start, start + n):
        if fail_every and i % fail_every == 0:
            j.add(rec(i, fn, "raised", f"ValueError: bad {i}"), None)
        else:
            j.add(rec(i, fn), fn(i))


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- keys


def test_task_key_is_stable_and_distinguishes_function_and_input():
    assert task_key(square, 3) == task_key(square, 3) == key_function(square)(3)
    assert task_key(square, 3) != task_key(square, 4)
    assert task_key(square, 3) != task_key(cube, 3)
    assert task_key(square, 1) != task_key(square, True) != task_key(square, 1.0)
    assert task_key(square, (1, 2)) != task_key(square, [1, 2])
    assert task_key(square, ("a", "bc")) != task_key(square, ("ab", "c"))
    assert task_key(square, {"a": 1, "b": 2}) == task_key(square, {"b": 2, "a": 1})
    assert function_id(square) == f"{__name__}:square"
    assert function_id(Pow()) == f"{__name__}:Pow"
    import functools

    assert function_id(functools.partial(square)) != function_id(functools.partial(cube))
    k = task_key(square, 7)
    assert k.endswith("=i7;") and len(k) == 12  # a short input is the key itself, after the function's tag
    long_key = task_key(square, "x" * 40)  # a long (or unprintable) one is hashed: 128 bits, never an '='
    assert len(long_key) == 32 and int(long_key, 16) >= 0
    assert task_key(square, "a\n") != task_key(square, "a ") and "=" not in task_key(square, "a\n")


def test_task_key_is_the_same_in_other_processes_whatever_the_hash_seed():
    item = {"names": {"alpha", "beta", "gamma", "delta"}, "n": 3, "x": [1.5, None, b"\x00"]}
    code = ("import sys, pickle; from ipmtc.journal import key_for; "
            "print(key_for('m:f', pickle.loads(sys.stdin.buffer.read())))")
    keys = set()
    for seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(item), capture_output=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        keys.add(out.stdout.decode().strip())
    assert keys == {key_for("m:f", item)}


def test_unpicklable_input_needs_key():
    with pytest.raises(JournalError, match="key="):
        task_key(square, lambda: 1)


# --------------------------------------------------------------------------- storage


def test_roundtrip_reopen_and_failed_tasks(tmp_path):
    db = tmp_path / "run.db"
    with Journal.open(db, fn=square) as j:
        assert j.lookup(task_key(square, 1)) is None  # empty journal: nothing stored
        fill(j, 50, fail_every=10)
        j.add(rec(99, square), {"nested": [1, 2, (3,)]})
    with Journal.open(db, fn=square) as j:
        value, stored = j.lookup(task_key(square, 7))
        assert value == 49 and stored["outcome"] == "ok" and stored["host"] == "node1" and stored["attempts"] == 1
        assert j.lookup(task_key(square, 99))[0] == {"nested": [1, 2, (3,)]}
        value, stored = j.lookup(task_key(square, 10))  # failed: a hit that stays failed
        assert value is None and stored["outcome"] == "raised" and stored["error"] == "ValueError: bad 10"
        assert j.lookup(task_key(square, 1000)) is None
        assert (j.hits_ok, j.hits_failed) == (2, 1)
        assert j.counts() == {"ok": 46, "raised": 5}
    with Journal.open(db, fn=square, retry_failed=True) as j:
        assert j.lookup(task_key(square, 10)) is None  # rerun
        assert j.lookup(task_key(square, 7))[0] == 49
        j.add(rec(10, square), 100)  # the rerun succeeds: replaces the failed row
    r = Journal.open(db, readonly=True)
    try:
        rows = list(r.rows(values=True))
        assert len(rows) == 51 and len({x["key"] for x in rows}) == 51
        assert r.counts() == {"ok": 47, "raised": 4}
        assert [x["run"] for x in rows if x["idx"] == 10] == [3]
        assert {x["idx"] for x in r.rows(failed_only=True)} == {0, 20, 30, 40}
        assert [x["run"] for x in r.runs()] == [1, 2, 3]
    finally:
        r.close()
    con = sqlite3.connect(db)  # after a normal close everything is in the tasks table, one row per key
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM tasks").fetchone() == (51, 51)
    assert unfolded(db) == 0
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.close()


def test_unmerged_inbox_is_read_everywhere(tmp_path, monkeypatch):
    """A short map with many records leaves its batches in the inbox; every reader still sees them."""
    db = tmp_path / "run.db"
    monkeypatch.setattr(journal_writer, "MERGE_ALWAYS", 10)
    monkeypatch.setattr(journal_writer, "MERGE_COST_S", 1.0)  # 'folding costs too much': leave it to the next open
    with Journal.open(db, fn=square) as j:
        fill(j, 300, fail_every=100)
    assert unfolded(db) == 300
    r = Journal.open(db, readonly=True)
    assert r.counts() == {"ok": 297, "raised": 3}
    assert len(list(r.rows())) == 300
    r.close()
    with Journal.open(db, fn=square, retry_failed=True) as j:  # preloaded lookups see the inbox
        assert j.lookup(task_key(square, 5))[0] == 25
        assert j.lookup(task_key(square, 100)) is None
        j.add(rec(100, square), 10_000)
    with Journal.open(db, fn=square) as j:
        j.compact()
        assert unfolded(db) == 0
        assert j.counts() == {"ok": 298, "raised": 2}
    with Journal.open(db, fn=square) as j:
        fill(j, 1, start=7)  # a rewrite of a row of the tasks table (few records: folded in at close)
    monkeypatch.setattr(journal_reader, "PRELOAD_MAX_ROWS", 0)  # task-by-task lookups: the open folds the inbox first
    with Journal.open(db, fn=square) as j:
        assert j.lookup(task_key(square, 100))[0] == 10_000
        assert j.lookup(task_key(square, 6))[0] == 36
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM tasks").fetchone() == (300, 300)
    con.close()


def test_engines_key_inputs_as_the_driver_does():
    """keys_for (run on the engines, with a fast path for ints) gives task_key's keys; bool is not int."""
    items = [0, 1, -5, 10**30, True, False, 2.5, "a", b"a", None, (1, "x"), [1, 2], {"b": 1, "a": 2}, {3, 1}]
    assert J.keys_for(J.key_prefix(square), items) == [task_key(square, x) for x in items]
    assert len(set(J.keys_for(J.key_prefix(square), [1, True, 1.0]))) == 3
    assert J.keys_for(J.key_prefix(square), [lambda: 0]) == [None]  # cannot be keyed: the driver says why
    # as the engines send them: small ints as they are (spelled out when read), else the keys
    prefix = J.key_prefix(square)
    for batch in ([0, 7, -3], [1, 10**30], [1, True], items):
        blob, bad = J.pack_keys(prefix, batch)
        assert J.unpack_keys(blob) == [task_key(square, x) for x in batch] and bad == []
    blob, bad = J.pack_keys(prefix, [1, lambda: 0, "x"])
    assert bad == [1] and J.unpack_keys(blob) == [task_key(square, 1), task_key(square, "x")]


def test_chunks_pickled_by_engines_are_stored_as_they_came(tmp_path, monkeypatch):
    """add_chunk: one batch per chunk, as it came; duplicates skipped, attempts kept; folded like any batch."""
    from ipmtc.maps import runner

    tasks = [(i, i) for i in range(5)]
    rows = [(i, runner.OK, i * i, 100.0 + i, 101.0 + i) for i in range(5)]
    blob = runner._for_journal(J.key_prefix(square), tasks, rows)
    assert rows == []  # each task travels once: inside the journal's pickle
    db = tmp_path / "run.db"
    monkeypatch.setattr(journal_writer, "MERGE_ALWAYS", 0)
    monkeypatch.setattr(journal_writer, "MERGE_COST_S", 1.0)  # keep the chunk in the inbox for the first reader
    with Journal.open(db, fn=square) as j:
        j.add_chunk(blob, 4, 3, "node7", 4242, skip=[2], overrides={4: (2, 1)})
        j.add(rec(9), 81)  # a record the driver made, in the same journal
    r = Journal.open(db, readonly=True)
    got = {row["idx"]: row for row in r.rows(values=True)}
    r.close()
    assert sorted(got) == [0, 1, 3, 4, 9]
    for i in (0, 1, 3, 4):
        row = got[i]
        assert row["key"] == task_key(square, i) and row["value"] == i * i and row["outcome"] == "ok"
        assert (row["engine_id"], row["host"], row["pid"], row["started"]) == (3, "node7", 4242, 100.0 + i)
        assert (row["attempts"], row["resubmits"]) == ((2, 1) if i == 4 else (1, 0))
    with Journal.open(db, fn=square) as j:  # lookups see it; the fold moves it into the tasks table
        assert j.lookup(task_key(square, 3))[0] == 9 and j.lookup(task_key(square, 2)) is None
        j.compact()
    con = sqlite3.connect(db)
    assert unfolded(db) == 0
    assert con.execute("SELECT count(*) FROM tasks").fetchone() == (5,)
    con.close()


def test_user_keys_and_group_commit_without_a_timer(tmp_path):
    """The writer commits whenever it is idle: with a 60 s interval, records are durable without flush()."""
    db = tmp_path / "run.db"
    with Journal.open(db, fn=square, flush_interval_s=60) as j:
        for i in range(250):
            j.add(rec(i, key=f"task-{i}"), i)
        deadline = time.monotonic() + 30
        while j.n_recorded < 250 and time.monotonic() < deadline:  # a condition with a deadline, not a time
            time.sleep(0.01)
        assert j.n_recorded == 250
        with Journal.open(db, readonly=True) as r:  # committed: another connection sees them
            assert r.counts() == {"ok": 250}
    with Journal.open(db, fn=square) as j:
        assert j.lookup("task-249")[0] == 249


def test_unpicklable_result_is_not_recorded(tmp_path):
    db = tmp_path / "run.db"
    with pytest.warns(JournalWarning, match="cannot be recorded .task .*: its result cannot be pickled"):
        with Journal.open(db, fn=square) as j:
            j.add(rec(1), 1)
            j.add(rec(2), lambda: 2)
            j.add(rec(3), 9)
    with Journal.open(db, fn=square) as j:
        assert j.lookup(task_key(square, 1))[0] == 1 and j.lookup(task_key(square, 3))[0] == 9
        assert j.lookup(task_key(square, 2)) is None  # runs again


def test_unclosed_journal_is_collected_and_lets_go_without_committing(tmp_path):
    """Dropped without close(): the writer thread does not keep it alive; its finalizer closes the file and
    releases the lock, commits nothing (what was only queued is lost, as in a crash) and ends the thread."""
    db = tmp_path / "run.db"
    j = Journal.open(db, fn=square, flush_interval_s=60)
    j.add(rec(1), 1)
    j.flush()  # recorded
    j.add(rec(2), 4)  # queued (the group commit may or may not have taken it yet)
    thread = j._writer._thread
    ref = weakref.ref(j)
    del j
    assert ref() is None  # no reference cycle, the thread holds only the writer and the store
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert all(t.name != "ipmtc-journal-run.db" for t in threading.enumerate())
    with Journal.open(db, fn=square) as j:  # the lock is free
        assert j.lookup(task_key(square, 1))[0] == 1


# --------------------------------------------------------------------------- bad input


def test_different_function_is_refused(tmp_path):
    db = tmp_path / "run.db"
    with Journal.open(db, fn=square) as j:
        fill(j, 3)
    with pytest.raises(JournalError) as ei:
        Journal.open(db, fn=cube)
    msg = one_line(ei.value)
    assert "belongs to a map of" in msg and "square" in msg and "cube" in msg and "never mixed" in msg
    with Journal.open(db, fn=square) as j:  # the refused open took no lock and changed nothing
        assert j.lookup(task_key(square, 2))[0] == 4


def test_different_context_is_refused(tmp_path):
    db = tmp_path / "run.db"
    Journal.open(db, fn=square, context={"outdir": "a"}).close()
    with pytest.raises(JournalError, match="outdir 'a'.*outdir 'b'"):
        Journal.open(db, fn=square, context={"outdir": "b"})


def test_incompatible_schema_version(tmp_path):
    db = tmp_path / "run.db"
    Journal.open(db, fn=square).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    con.commit()
    con.close()
    for opener in (lambda: Journal.open(db, fn=square), lambda: Journal.open(db, readonly=True)):
        with pytest.raises(JournalError) as ei:
            opener()
        assert "format version 99" in one_line(ei.value) and f"version {J.SCHEMA_VERSION} only" in str(ei.value)


def test_not_a_journal(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a database\n" * 100)
    with pytest.raises(JournalError, match="not an ipmtc journal .not an SQLite database"):
        Journal.open(text, fn=square)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(JournalError, match="SQLite database but not an ipmtc journal"):
        Journal.open(other, fn=square)
    with pytest.raises(JournalError, match="is a directory"):
        Journal.open(tmp_path, fn=square)
    with pytest.raises(JournalError, match="does not exist"):
        Journal.open(tmp_path / "missing" / "run.db", fn=square)
    with pytest.raises(JournalError, match="does not exist"):
        Journal.open(tmp_path / "missing.db", readonly=True)
    assert issubclass(JournalError, IpmtcError)


HOLDER = textwrap.dedent("""
    import sys, time
    from ipmtc.journal import Journal
    def square(x): return x * x
    j = Journal.open(sys.argv[1], fn=square)
    j.flush()  # a new journal's file is set up by the writer thread: wait for it (a map's first commit does)
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_driver_refused_until_the_first_dies(tmp_path):
    db = tmp_path / "run.db"
    with Journal.open(db, fn=square):
        with pytest.raises(JournalError) as ei:
            Journal.open(db, fn=square)  # same process, second open
        assert f"pid {os.getpid()}" in one_line(ei.value) and "in use by another driver" in str(ei.value)
    db = tmp_path / "script.db"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(JournalError, match=f"in use by another driver .pid {p.pid} on host"):
            Journal.open(db, fn=main_square)
        r = Journal.open(db, readonly=True)  # inspection works meanwhile
        assert r.counts() == {}
        r.close()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    Journal.open(db, fn=main_square).close()  # SIGKILL released the lock


def test_read_only_directory_is_refused_at_open(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    existing = d / "old.db"
    with Journal.open(existing, fn=main_square) as j:
        fill(j, 5, fn=main_square)
    os.chmod(d, 0o555)
    os.chmod(existing, 0o444)
    os.chmod(f"{existing}.lock", 0o666)  # the lock can be taken: SQLite itself must find it read-only
    code = textwrap.dedent("""
        import sys
        from ipmtc.errors import JournalError
        from ipmtc.journal import Journal
        def square(x): return x * x
        for path in sys.argv[1:]:
            try:
                Journal.open(path, fn=square).close()
                print("OPENED", path)
            except JournalError as e:
                print("ERR", e)
        r = Journal.open(sys.argv[2], readonly=True)
        print("COUNTS", r.counts())
    """)
    try:
        argv = [sys.executable, "-c", code, str(d / "new.db"), str(existing)]
        if os.geteuid() == 0:  # root ignores permissions unless it gives up the capabilities that allow it
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot make a directory read-only for this test")
            argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(d, 0o755)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert len(lines) == 3, out.stdout
    assert lines[0].startswith("ERR cannot create the journal lock file") and "directory must be writable" in lines[0]
    assert lines[1].startswith("ERR") and ("read-only" in lines[1] or "Permission denied" in lines[1])
    assert lines[2] == "COUNTS {'ok': 5}"


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, time, warnings
    from ipmtc.journal import Journal, task_key
    from ipmtc.maps.result import TaskRecord
    def square(x): return x * x
    j = Journal.open(sys.argv[1], fn=square)
    j.add(TaskRecord(index=0, key=task_key(square, 0), outcome="ok", attempts=1), 0)
    j.flush()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for i in range(1, 200):
            j.add(TaskRecord(index=i, key=task_key(square, i), outcome="ok", attempts=1), b"x" * 50_000)
            if i % 10 == 0:
                j.flush()
        j.close()
    print("RECORDED", j.n_recorded, "UNRECORDED", j.n_unrecorded)
    print("WARN", [str(x.message) for x in w if x.category.__name__ == "JournalWarning"][0])
    print("ERROR", j.error)
""")


def test_full_disk_is_reported_and_recorded_tasks_survive(tmp_path):
    db = tmp_path / "run.db"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(db)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    recorded, unrecorded = map(int, got["RECORDED"].split(" UNRECORDED "))
    assert 1 <= recorded < 199 and recorded + unrecorded == 200
    assert "could not be written" in got["WARN"] and ("full" in got["WARN"] or "I/O" in got["WARN"])
    assert got["ERROR"] == got["WARN"]
    r = Journal.open(db, readonly=True)
    try:
        assert sum(r.counts().values()) == recorded  # exactly what was recorded is there, nothing more
    finally:
        r.close()


CRASHER = textwrap.dedent("""
    import sys, time
    from ipmtc.journal import Journal, task_key
    from ipmtc.maps.result import TaskRecord
    def square(x): return x * x
    j = Journal.open(sys.argv[1], fn=square, flush_interval_s=0.01, batch=50)
    start = int(sys.argv[2])
    for i in range(start, 10**7):
        j.add(TaskRecord(index=i, key=task_key(square, i), outcome="ok", attempts=1), i * i)
        if i % 97 == 0:
            j.flush()
            print(j.n_recorded + start, flush=True)  # committed: [0, this) are recorded
""")


def test_sigkill_while_writing_loses_nothing_recorded(tmp_path):
    db = tmp_path / "run.db"
    committed = 0
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", CRASHER, str(db), str(committed)], stdout=subprocess.PIPE,
                             text=True)
        last = committed
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            last = int(line)
            if last >= committed + 3000:
                break
        os.kill(p.pid, signal.SIGKILL)  # mid-stream: more batches are being written right now
        p.wait()
        r = Journal.open(db, readonly=True)
        keys = {row["key"]: row for row in r.rows()}
        r.close()
        assert all(task_key(main_square, i) in keys for i in range(last)), "a committed task was lost"
        committed = max(i for i in (row["idx"] for row in keys.values())) + 1
        assert len(keys) == committed  # contiguous, no gaps
    with Journal.open(db, fn=main_square) as j:  # every batch is folded in by now: one row per task
        assert j.lookup(task_key(main_square, committed - 1))[0] == (committed - 1) ** 2
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM tasks").fetchone() == (committed, committed)
    con.close()


# --------------------------------------------------------------------------- ipmtc journal show


def test_journal_show_counts_failed_and_exports(tmp_path):
    db = tmp_path / "run.db"
    with Journal.open(db, fn=square) as j:
        fill(j, 40, fail_every=8)
    runner = CliRunner()
    res = runner.invoke(cli_main, ["journal", "show", str(db)])
    assert res.exit_code == 0, res.output
    assert "map of tests.unit.test_journal_unit:square, 40 tasks recorded in 1 run" in res.output
    assert " ok               35" in res.output and " raised            5" in res.output
    assert "failed tasks (5):" in res.output and "ValueError: bad 16" in res.output
    csv_out, jsonl_out = tmp_path / "t.csv", tmp_path / "t.jsonl"
    res = runner.invoke(cli_main, ["journal", "show", str(db), "--failed", "--csv", str(csv_out),
                                   "--jsonl", str(jsonl_out)])
    assert res.exit_code == 0, res.output
    import csv

    rows = list(csv.DictReader(csv_out.open()))
    assert len(rows) == 5 and {r["outcome"] for r in rows} == {"raised"}
    res = runner.invoke(cli_main, ["journal", "show", str(db), "--jsonl", str(jsonl_out)])
    recs = [json.loads(x) for x in jsonl_out.read_text().splitlines()]
    assert len(recs) == 40 and {r["value"] for r in recs if r["idx"] == 3} == {9}
    assert all(r["duration_s"] is not None for r in recs)
    res = runner.invoke(cli_main, ["journal", "show", str(tmp_path / "nope.db")])
    assert res.exit_code == 1 and "does not exist" in res.output


# --------------------------------------------------------------------------- task files and commands


def test_read_task_file(tmp_path):
    f = tmp_path / "tasks.txt"
    f.write_bytes(b"\xef\xbb\xbf# header\n\necho one\r\n   # indented comment\n  sha256sum x  \necho 'two # three'\n")
    assert read_task_file(f) == [(3, "echo one"), (5, "sha256sum x"), (6, "echo 'two # three'")]


@pytest.mark.parametrize(("content", "match"), [
    (b"", "is empty"),
    (b"\n   \n", "is empty"),
    (b"# only\n\n  # comments\n", "only blank lines and # comments"),
    (b"echo ok\necho \xff\xfe bad\n", r"line 2: not valid UTF-8 \(byte 0xff at column 6\)"),
    (b"echo a\x00b\n", "line 1: contains a NUL byte"),
])
def test_bad_task_files(tmp_path, content, match):
    f = tmp_path / "tasks.txt"
    f.write_bytes(content)
    with pytest.raises(TaskFileError, match=match) as ei:
        read_task_file(f)
    one_line(ei.value)
    assert isinstance(ei.value, IpmtcError)


def test_missing_task_file(tmp_path):
    with pytest.raises(TaskFileError, match="does not exist"):
        read_task_file(tmp_path / "nope.txt")


def test_command_key_is_line_and_text():
    assert command_key((3, "echo a", "/out", "/", None)) == command_key((3, "echo a", "/elsewhere", "/tmp", 5))
    assert command_key((3, "echo a")) != command_key((4, "echo a"))
    assert command_key((3, "echo a")) != command_key((3, "echo b"))
    assert command_key((3, "echo a")).startswith("3:")


def test_run_command_outputs_exit_codes_and_walltime(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "KILL_GRACE_S", 1.0)
    out = tmp_path / "out"
    r = run_command((4, "echo hello; echo oops >&2; printf %s \"$IPMTC_TASK_LINE\" > line.txt", str(out),
                     str(tmp_path), None))
    assert r["line"] == 4 and r["exit"] == 0 and r["duration_s"] >= 0
    assert (out / "4.out").read_text() == "hello\n" and (out / "4.err").read_text() == "oops\n"
    assert (tmp_path / "line.txt").read_text() == "4"  # ran in cwd, with its line number
    with pytest.raises(CommandFailed, match=r"line 5: exit code 3: .*\(stderr: nope\)"):
        run_command((5, "echo nope >&2; exit 3", str(out), str(tmp_path), None))
    with pytest.raises(CommandFailed, match="killed by signal 9"):
        run_command((6, "kill -9 $$", str(out), str(tmp_path), None))
    # walltime: the whole process group goes, a grandchild that ignores SIGTERM included
    t0 = time.monotonic()
    with pytest.raises(CommandWalltime, match="line 7: ran longer than walltime 0.5 s"):
        run_command((7, "sh -c 'trap \"\" TERM; echo $$ > gc.pid; sleep 30' & sleep 30", str(out), str(tmp_path),
                     0.5))
    took = time.monotonic() - t0
    grandchild = int((tmp_path / "gc.pid").read_text())
    assert 1.5 <= took < 0.5 + 1 + 3, took  # TERM, a grace period (1 s here), then KILL
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_group_members_ignores_other_groups():
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert _group_members(p.pid) == [p.pid]
    finally:
        p.kill()
        p.wait()
    assert _group_members(p.pid) == []


def test_result_whose_class_is_gone_runs_again(tmp_path, monkeypatch):
    mod = tmp_path / "gone_mod.py"
    mod.write_text("class Point:\n    def __init__(self, x):\n        self.x = x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_mod

    db = tmp_path / "run.db"
    with Journal.open(db, fn=square) as j:
        j.add(rec(1), gone_mod.Point(1))
        j.add(rec(2), 4)
    monkeypatch.delitem(sys.modules, "gone_mod")
    mod.unlink()
    for preload in (True, False):
        monkeypatch.setattr(journal_reader, "PRELOAD_MAX_ROWS", 10 if preload else 0)
        with pytest.warns(JournalWarning, match="cannot be unpickled"):
            with Journal.open(db, fn=square) as j:
                assert j.lookup(task_key(square, 1)) is None
                assert j.lookup(task_key(square, 2))[0] == 4
    r = Journal.open(db, readonly=True)
    rows = {x["idx"]: x["value"] for x in r.rows(values=True)}
    r.close()
    assert rows[2] == 4 and rows[1].startswith("<result cannot be unpickled here")


# ---------------------------------------------------------------- the inbox file


def test_a_record_cut_short_ends_the_inbox_and_is_cut_off_by_the_next_driver(tmp_path, monkeypatch):
    """A crash mid-write leaves a torn last record: readers stop before it, the next driver cuts it off."""
    db = tmp_path / "run.db"
    monkeypatch.setattr(journal_writer, "MERGE_ALWAYS", 0)
    monkeypatch.setattr(journal_writer, "MERGE_COST_S", 1.0)  # leave everything in the inbox
    with Journal.open(db, fn=square) as j:
        fill(j, 10)
        j.flush()
        fill(j, 10, start=10)
    box = journal_inbox.inbox_path(db)
    whole = box.read_bytes()
    assert unfolded(db) == 20
    for torn in (whole[:-7], whole + b"\0" * 40, whole + whole[:30]):  # cut short; zeros; a header, no body
        box.write_bytes(torn)
        r = Journal.open(db, readonly=True)
        assert r.counts()["ok"] in (10, 20)  # the whole records only
        r.close()
    box.write_bytes(whole[:-7])  # the second record torn: only the first 10 tasks survive
    with Journal.open(db, fn=square) as j:
        assert j.lookup(task_key(square, 3))[0] == 9 and j.lookup(task_key(square, 15)) is None
        j.add(rec(15), 225)  # appended after the cut: readable
    r = Journal.open(db, readonly=True)
    assert r.counts() == {"ok": 11} and {x["idx"] for x in r.rows()} == {*range(10), 15}
    r.close()


def test_a_fold_interrupted_before_the_inbox_is_emptied_changes_nothing(tmp_path, monkeypatch):
    """The fold commits the tasks table, then empties the inbox: a crash between folds the same again."""
    db = tmp_path / "run.db"
    with Journal.open(db, fn=square) as j:
        fill(j, 20, fail_every=7)
    box = journal_inbox.inbox_path(db)
    with Journal.open(db, fn=square, retry_failed=True) as j:
        j.add(rec(7), 49)  # a later record of a key already folded
        j.flush()
        saved = box.read_bytes()  # what is in the inbox before the fold at close
    box.write_bytes(saved)  # as if the driver died after the fold's commit, before emptying the inbox
    with Journal.open(db, fn=square) as j:  # folds the same records again
        assert j.lookup(task_key(square, 7))[0] == 49
        assert j.counts() == {"ok": 18, "raised": 2}
    assert unfolded(db) == 0


def test_journal_files_are_private_whatever_the_umask_and_symlinks_are_not_followed(tmp_path):
    old = os.umask(0)
    try:
        db = tmp_path / "run.db"
        with Journal.open(db, fn=square) as j:
            fill(j, 3)
            j.flush()
            list(j.rows())  # the reader's connection: SQLite makes -wal and -shm
        files = [p for p in tmp_path.iterdir() if p.name.startswith("run.db")]
        assert {p.name for p in files} >= {"run.db", "run.db.inbox", "run.db.lock"}
        for p in files:
            assert p.stat().st_mode & 0o077 == 0, f"{p.name} is {oct(p.stat().st_mode)}"
        target = tmp_path / "victim"
        target.write_text("")
        db2 = tmp_path / "two.db"
        (tmp_path / "two.db.inbox").symlink_to(target)  # planted before the journal is made
        with pytest.raises(JournalError, match="two.db"):
            Journal.open(db2, fn=square)
        assert target.read_text() == ""
    finally:
        os.umask(old)


def test_the_inbox_is_read_one_record_at_a_time(tmp_path, monkeypatch):
    """An inbox of many large results is never read whole: opening, counting, folding go record by record."""
    db = tmp_path / "run.db"
    monkeypatch.setattr(journal_writer, "MERGE_ALWAYS", 0)
    monkeypatch.setattr(journal_writer, "MERGE_COST_S", 1.0)  # leave everything in the inbox
    big = b"x" * 200_000
    with Journal.open(db, fn=square) as j:
        for k in range(6):
            j.add(rec(k), big)
            j.flush()  # one record each
    whole = journal_inbox.inbox_path(db).stat().st_size
    asked: list[int] = []
    pread = os.pread

    def counting(fd, n, offset):
        asked.append(n)
        return pread(fd, n, offset)

    monkeypatch.setattr(journal_inbox.os, "pread", counting)
    assert journal_inbox.size(journal_inbox.inbox_path(db))[0] == 6
    with Journal.open(db, fn=square) as j:
        assert j.lookup(task_key(square, 5))[0] == big
        j.compact()  # the fold
    assert asked and max(asked) < whole / 3, (max(asked), whole)
    assert unfolded(db) == 0
