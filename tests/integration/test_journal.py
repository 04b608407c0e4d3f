"""The task journal with real maps: a driver SIGKILLed three times, failed tasks, full disk, refusals.

One 4-engine local cluster for the module (``shared_cluster``: private
IPYTHONDIR, stopped and checked for leftover processes at the end). Drivers
that get killed are real ``python driver.py`` processes.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ipmtc.errors import JournalError
from ipmtc.journal import Journal, function_id, inbox, key_for
from ipmtc.maps import dynamic_map, static_map

from .._wait import wait_for

N = 2000

DRIVER = textwrap.dedent("""
    import json, sys
    import ipmtc
    from ipmtc.maps import dynamic_map

    profile, db, out, run, limit, gate = sys.argv[1:7]

    def work(i, _marks={marks!r}, _run=int(run), _limit=int(limit), _gate=gate):
        import os, time
        deadline = time.monotonic() + 300
        while i >= _limit and not os.path.exists(_gate) and time.monotonic() < deadline:
            time.sleep(0.01)  # held: this driver cannot finish before the test has killed it
        fd = os.open(f"{{_marks}}/{{i}}", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, bytes([_run]))  # one byte per execution of task i: the driver it ran for
        os.close(fd)
        time.sleep(0.004)
        return i * i

    rc = ipmtc.connect(profile)
    # small chunks: a killed driver leaves little queued on the engines, so three kills fit in one map
    res = dynamic_map(work, range({n}), client=rc, journal=db, progress=False, chunksize=10)
    with open(out, "w") as f:
        json.dump({{"values": list(res), "failed": len(res.failed), "hits": res.journal_hits,
                   "summary": res.summary()}}, f)
""")


def _env(cluster) -> dict[str, str]:
    return {**os.environ, "IPYTHONDIR": str(Path(cluster.profile_dir).parent)}


def _executions(marks: Path) -> dict[int, bytes]:
    """Task -> the driver (run number) of each of its executions."""
    return {int(p.name): p.read_bytes() for p in marks.iterdir()}


def _recorded(db: Path) -> dict[int, dict]:
    """idx -> row of every task the journal holds (tasks table and unmerged batches), checked unique."""
    r = Journal.open(db, readonly=True)
    try:
        rows = list(r.rows(values=True))
        assert r._reader().execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        r.close()
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "a task is recorded twice"
    by_idx = {row["idx"]: row for row in rows}
    assert len(by_idx) == len(rows)
    for i, row in by_idx.items():
        assert row["key"] == key_for("__main__:work", i) and row["outcome"] == "ok" and row["value"] == i * i
    return by_idx


def test_driver_sigkilled_three_times_then_finishes(shared_cluster, rc, tmp_path):
    """Three drivers SIGKILLed at random points, a fourth finishes: no recorded task runs again.

    Each killed driver's tasks past a limit wait at a gate the test opens only after the kill (so it
    cannot finish first); what a dead driver left on the engines then runs on, unrecorded, and its
    executions are told apart from the later drivers' by the run number each execution writes.
    """
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    marks = tmp_path / "marks"
    marks.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(marks=str(marks), n=N))
    db, out = tmp_path / "run.db", tmp_path / "out.json"
    argv = [sys.executable, str(driver), shared_cluster.profile, str(db), str(out)]
    snapshots = []  # tasks recorded at each kill
    for kill in range(3):
        gate, limit = tmp_path / f"gate-{kill}", (kill + 1) * (N // 4)
        threshold = len(os.listdir(marks)) + rng.randint(150, 300)  # the kill comes after this many new tasks
        p = subprocess.Popen([*argv, str(kill), str(limit), str(gate)], env=_env(shared_cluster),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda t=threshold, p=p: len(os.listdir(marks)) >= t or p.poll() is not None, 60,
                     f"{threshold} tasks run (seed {seed})", interval_s=0.005)
            time.sleep(rng.uniform(0.0, 0.15))  # and lands anywhere: in a batch write, between two, ...
            assert p.poll() is None, f"driver ended before kill {kill + 1} (seed {seed}): {p.stderr.read()!r}"
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.kill()
            p.wait()
            p.stderr.close()
            gate.touch()  # what the dead driver left waiting on the engines runs now, unrecorded
        assert not out.exists()
        snapshots.append(_recorded(db))
    recorded_counts = [len(s) for s in snapshots]
    # a kill in a driver's first half second finds nothing new recorded: a random point too
    assert recorded_counts == sorted(recorded_counts) and recorded_counts[-1] > 0, (recorded_counts, seed)

    subprocess.run([*argv, "3", str(N), str(tmp_path / "no-gate")], env=_env(shared_cluster), check=True,
                   timeout=120)
    result = json.loads(out.read_text())
    assert result["values"] == [i * i for i in range(N)] and result["failed"] == 0
    assert result["hits"] == len(snapshots[-1])  # everything recorded came from the journal
    final = _recorded(db)
    assert sorted(final) == list(range(N))  # every task exactly once
    execs = _executions(marks)
    assert sorted(execs) == list(range(N)) and all(len(runs) >= 1 for runs in execs.values())
    for k, recorded in enumerate(snapshots):
        rerun = [i for i in recorded if max(execs[i]) > k]  # run by a driver started after kill k
        assert rerun == [], f"tasks recorded before kill {k + 1} ran again: {rerun[:10]} (seed {seed})"
        for i, row in recorded.items():  # and their rows were not rewritten by a later driver
            assert final[i]["run"] == row["run"] and final[i]["recorded"] == row["recorded"]
    con = sqlite3.connect(db)  # the last driver closed normally: everything folded into the tasks table
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM tasks").fetchone() == (N, N)
    assert inbox.size(inbox.inbox_path(db))[0] == 0  # the inbox file is empty
    assert [r[0] for r in con.execute("SELECT run FROM runs ORDER BY run")] == [1, 2, 3, 4]
    con.close()


def flaky(x, _flag=None):
    if x % 10 == 3 and not (_flag and os.path.exists(_flag)):
        raise ValueError(f"bad input {x}")
    return x + 1


def fails_once(x, marks):
    import os

    mark = os.path.join(marks, str(x))
    if x % 7 == 0 and not os.path.exists(mark):
        open(mark, "w").close()
        raise RuntimeError(f"first attempt of {x}")
    return -x


@pytest.mark.parametrize("schedule", [dynamic_map, static_map])
def test_journal_rows_hold_what_ran_where(rc, tmp_path, schedule):
    """Keys and results come pickled from the engines; attempts, engine, host and pid are right."""
    db, marks = tmp_path / "run.db", tmp_path / "marks"
    marks.mkdir()
    items = [(x, str(marks)) for x in range(120)]
    res = schedule(fails_once, items, star=True, retries=1, client=rc, journal=str(db), progress=False)
    assert res.ok and list(res) == [-x for x in range(120)]
    r = Journal.open(db, readonly=True)
    rows = {row["idx"]: row for row in r.rows(values=True)}
    r.close()
    assert sorted(rows) == list(range(120))
    where = {(rec.engine_id, rec.host, rec.pid) for rec in res.records}
    for x, row in rows.items():
        assert row["key"] == key_for(function_id(fails_once), items[x]) and row["value"] == -x
        assert row["attempts"] == (2 if x % 7 == 0 else 1)
        assert (row["engine_id"], row["host"], row["pid"]) in where
    again = schedule(fails_once, items, star=True, client=rc, journal=str(db), progress=False)
    assert again.journal_hits == 120 and list(again) == list(res)


def test_failed_tasks_stay_failed_until_retry_failed(rc, tmp_path):
    db, flag = tmp_path / "run.db", tmp_path / "fixed"
    items = list(range(60))

    def run(**kw):
        # the flag's path is bound through star args so the function (its identity and key) stays the same
        return dynamic_map(flaky, [(x, str(flag)) for x in items], client=rc, journal=str(db), star=True,
                           progress=False, **kw)

    res = run()
    assert len(res.failed) == 6 and res.journal_hits == 0
    assert {f.index for f in res.failed} == {3, 13, 23, 33, 43, 53}
    again = run()
    assert again.journal_hits == 60 and len(again.failed) == 6  # stored failures are results too
    assert all(r.submitted is None for r in again.records)  # nothing was sent to an engine
    assert [v for v in again if not hasattr(v, "ename")] == [v for v in res if not hasattr(v, "ename")]
    assert {f.ename for f in again.failed} == {"ValueError"}
    assert any("bad input 3" in f.evalue for f in again.failed)
    flag.touch()
    fixed = run(retry_failed=True)
    assert fixed.ok and fixed.journal_hits == 54 and list(fixed) == [x + 1 for x in items]
    ran = [r.index for r in fixed.records if r.submitted is not None]
    assert ran == [3, 13, 23, 33, 43, 53]
    last = static_map(flaky, [(x, str(flag)) for x in items], client=rc, journal=str(db), star=True,
                      progress=False)
    assert last.ok and last.journal_hits == 60 and list(last) == [x + 1 for x in items]
    r = Journal.open(db, readonly=True)
    assert r.counts() == {"ok": 60}
    r.close()


def test_refusals_before_anything_runs(rc, tmp_path):
    db = tmp_path / "run.db"
    dynamic_map(flaky, [1, 2], client=rc, journal=str(db), progress=False)
    with pytest.raises(JournalError, match="belongs to a map of .*flaky, not of .*_other"):
        dynamic_map(_other, [1, 2], client=rc, journal=str(db), progress=False)
    holder = Journal.open(db, fn=flaky)
    try:
        t0 = time.monotonic()
        with pytest.raises(JournalError, match=f"in use by another driver .pid {os.getpid()}"):
            dynamic_map(flaky, [1, 2, 3], client=rc, journal=str(db), progress=False)
        assert time.monotonic() - t0 < 2
    finally:
        holder.close()
    assert dynamic_map(flaky, [1, 2, 3], client=rc, journal=str(db), progress=False).journal_hits == 2


def _other(x):
    return x


FULL_DISK_DRIVER = textwrap.dedent("""
    import json, resource, signal, sys, warnings
    import ipmtc
    from ipmtc.errors import JournalError
    from ipmtc.maps import dynamic_map

    def blob(i):
        import time
        time.sleep(0.004)  # about 1.5 s in all: the journal commits a few batches, then the disk is full
        return bytes([i % 256]) * 1000

    profile, db, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rc = ipmtc.connect(profile)
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the limit: EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    raised = None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            res = dynamic_map(blob, range(1500), client=rc, journal=db, progress=False)
        except JournalError as e:  # how the dispatcher may report it: the results ride along
            raised, res = str(e), e.result
    print(json.dumps({"ok": list(res) == [bytes([i % 256]) * 1000 for i in range(1500)], "hits": res.journal_hits,
                      "raised": raised, "warnings": [str(x.message) for x in w]}))
""")


def test_full_disk_keeps_the_results_and_says_so(shared_cluster, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(FULL_DISK_DRIVER)
    db = tmp_path / "run.db"
    argv = [sys.executable, str(driver), shared_cluster.profile, str(db)]
    out = subprocess.run([*argv, str(1_000_000)], env=_env(shared_cluster), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout.splitlines()[-1])
    assert first["ok"], "the map's results must all be returned"
    msg = first["raised"] or next(m for m in first["warnings"] if "could not be written" in m)
    assert f"journal {db} could not be written" in msg and "\n" not in msg
    assert "full" in msg or "I/O error" in msg
    r = Journal.open(db, readonly=True)
    recorded = sum(r.counts().values())
    r.close()
    assert 0 < recorded < 1500  # some batches made it before the disk filled up
    out = subprocess.run([*argv, "0"], env=_env(shared_cluster), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    second = json.loads(out.stdout.splitlines()[-1])
    assert second["ok"] and second["hits"] == recorded and not second["raised"] and not second["warnings"]
