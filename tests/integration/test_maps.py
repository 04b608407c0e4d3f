"""static_map / dynamic_map against real engines: results, faults, walltime, stragglers, memory."""
from __future__ import annotations

import gc
import os
import signal
import threading
import time

import psutil
import pytest

import ipmtc
from ipmtc import _proc
from ipmtc.errors import EnginesLostError, JournalError, MapError, NoClusterError
from ipmtc.journal import Journal
from ipmtc.maps.channel import Channel

from .._wait import Background, wait_for
from ..conftest import wait_all_dead


def square(x):
    return x * x


def sleepy(x):
    import time

    time.sleep(x)
    return x


def noop(x):
    return x


def test_static_and_dynamic_give_the_same_ordered_results(rc):
    items = list(range(1000))
    dyn = ipmtc.dynamic_map(square, items, client=rc, progress=False)
    sta = ipmtc.static_map(square, items, client=rc, progress=False)
    assert list(dyn) == list(sta) == [x * x for x in items]
    assert dyn.ok and sta.ok and len(dyn.records) == 1000
    # static: each engine its fair share, one message each
    per_engine = {}
    for r in sta.records:
        per_engine[r.engine_id] = per_engine.get(r.engine_id, 0) + 1
    assert sorted(per_engine.values()) == [250] * 4


def _journal_ok(path) -> int:
    """Tasks a map's journal records as done so far (0 while it is not there yet)."""
    try:
        r = Journal.open(path, readonly=True)
    except JournalError:  # not created yet
        return 0
    try:
        return r.counts().get("ok", 0)
    finally:
        r.close()


def last_to_finish(args):
    """Task 0 ends only once the gate (a file) exists; the others at once."""
    import os
    import time

    i, gate = args
    deadline = time.monotonic() + 120  # the test opens it long before, or has failed
    while i == 0 and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return i


def test_unordered_results_and_generators(rc, tmp_path):
    """Results in completion order: task 0 is held until the journal records another task, whose result
    the driver then has before task 0's."""
    gate, journal = tmp_path / "gate", tmp_path / "j.db"

    def open_gate():
        try:
            wait_for(lambda: _journal_ok(journal) > 0, 60, "a task recorded in the journal")
        finally:
            gate.touch()  # (also when that failed: the map must not hang)

    opener = Background(open_gate)
    opener.start()
    try:
        gen = ((i, str(gate)) for i in range(40))
        res = ipmtc.dynamic_map(last_to_finish, gen, client=rc, ordered=False, progress=False, chunksize=1,
                                journal=journal)
    finally:
        opener.check()
    out = list(res)
    assert sorted(out) == list(range(40))
    assert out[0] != 0 and out.index(0) > 0  # completion order, not input order
    assert len(res.records) == 40


def test_star_and_explicit_views(rc):
    res = ipmtc.dynamic_map(pow, [(2, 3), (3, 2)], client=rc.load_balanced_view(), star=True, progress=False)
    assert list(res) == [8, 9]
    two = rc[rc.ids[:2]]
    res = ipmtc.static_map(square, range(10), client=two, progress=False)
    assert list(res) == [x * x for x in range(10)]
    assert {r.engine_id for r in res.records} == set(rc.ids[:2])


def test_records_and_summary(rc):
    t0 = time.time()
    res = ipmtc.dynamic_map(sleepy, [0.05] * 16, client=rc, progress=False)
    took = time.time() - t0
    s = res.summary()
    assert s["tasks"] == 16 and s["ok"] == 16 and s["failed"] == 0 and s["engines"] == 4
    # 16 x 0.05 s on 4 engines: at least 0.2 s, and within the call
    assert 0.2 <= s["makespan_s"] <= took and 0 < s["efficiency"] <= 1
    for r in res.records:
        assert r.outcome == "ok" and r.attempts == 1 and r.engine_id in rc.ids
        assert r.submitted <= r.started + 0.5 and r.started < r.finished and r.pid > 0 and r.host


def flaky_once(path):
    """Raises on its first attempt (a marker file says it ran before)."""
    import os

    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL)
        os.close(fd)
    except FileExistsError:
        return "ok"
    raise ValueError(f"first attempt of {path}")


def test_retries_are_spent_on_exceptions_and_prefer_another_engine(rc, tmp_path):
    paths = [str(tmp_path / f"m{i}") for i in range(12)]
    res = ipmtc.dynamic_map(flaky_once, paths, client=rc, retries=1, progress=False)
    assert list(res) == ["ok"] * 12 and res.summary()["retries"] == 12
    moved = sum(r.history[0][0] != r.engine_id for r in res.records)
    assert moved == 12  # the retry ran on another engine than the failed attempt
    res = ipmtc.dynamic_map(flaky_once, [str(tmp_path / "x")], client=rc, retries=0, progress=False)
    (f,) = res.failed
    assert f.ename == "ValueError" and "first attempt" in f.evalue and "Traceback" in f.traceback
    assert f.engine_id in rc.ids and f.host and f.attempts == 1
    assert res[0] is f and not res.ok


def stuck_sleep(x):
    import time

    if x == 1:
        time.sleep(3600)
    return x


def stuck_in_c(x):
    if x == 1:
        sum(range(10**11))  # one long C call: signals cannot interrupt it
    return x


def use_path(rc, path: str, monkeypatch) -> None:
    """Chunks over the channel (listeners up before the map) or as ipyparallel applies."""
    if path == "applies":
        monkeypatch.setenv("IPMTC_DRIVER_IP", "off")
        return
    ipmtc.dynamic_map(square, range(8), client=rc, progress=False)
    ch = Channel.for_client(rc)
    wait_for(lambda: ch.connected == set(rc.ids), 10, lambda: f"every engine's listener (have {ch.connected})")


@pytest.mark.parametrize("path", ["channel", "applies"])
@pytest.mark.parametrize("fn", [stuck_sleep, stuck_in_c])
@pytest.mark.parametrize("schedule", [ipmtc.dynamic_map, ipmtc.static_map])
def test_walltime_kills_a_running_task(rc, shared_cluster, fn, schedule, path, monkeypatch):
    use_path(rc, path, monkeypatch)
    t0 = time.monotonic()
    res = schedule(fn, range(6), client=rc, walltime_s=1.0, retries=1, progress=False)
    assert time.monotonic() - t0 < 60  # not the task's 3600 s (or the C loop's half hour)
    assert [v for i, v in enumerate(res) if i != 1] == [0, 2, 3, 4, 5]
    (f,) = res.failed
    assert f.index == 1 and f.ename == "WalltimeExceeded" and f.attempts == 2  # retried once, killed twice
    assert res.records[1].outcome == "walltime"
    # the walltime killed the task, not the engine: the engines that answer are the ones the cluster started
    started = {int(eid): e["pid"] for eid, e in shared_cluster.engines.items()}
    assert sorted(rc.ids) == sorted(started)
    assert dict(zip(rc.ids, rc[:].apply_sync(os.getpid))) == started


def straggler(args):
    """Task 5 hangs on its first attempt only."""
    import os
    import time

    i, marker = args
    if i == 5:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            time.sleep(120)
        except FileExistsError:
            pass
    time.sleep(0.1)
    return i


@pytest.mark.parametrize("path", ["channel", "applies"])
def test_fast_abort_reruns_a_straggler(rc, tmp_path, path, monkeypatch):
    use_path(rc, path, monkeypatch)
    marker = str(tmp_path / "straggler")
    t0 = time.monotonic()
    res = ipmtc.dynamic_map(straggler, [(i, marker) for i in range(24)], client=rc, fast_abort=3,
                            chunksize=1, progress=False)
    assert time.monotonic() - t0 < 30
    assert list(res) == list(range(24)) and res.ok
    rec = res.records[5]
    assert rec.resubmits >= 1 and any(h[4] == "straggler" for h in rec.history)
    assert rec.attempts == 1  # aborting a straggler spends no retry


def test_bad_input_is_refused_before_anything_is_sent(rc):
    before = len(rc.history)
    lock = threading.Lock()
    cases = [
        (dict(fn=3), "must be callable"),
        (dict(retries=-1), "retries must be an integer >= 0"),
        (dict(walltime_s=0), "walltime_s must be a number of seconds > 0"),
        (dict(chunksize=0), "chunksize must be 'auto' or an integer >= 1"),
        (dict(fast_abort=1), "fast_abort must be a factor > 1"),
        (dict(fn=lambda x: lock.locked()), "cannot be sent to the engines"),
    ]
    for kwargs, msg in cases:
        fn = kwargs.pop("fn", square)
        for schedule in (ipmtc.dynamic_map, ipmtc.static_map):
            with pytest.raises(MapError, match=msg):
                schedule(fn, range(3), client=rc, progress=False, **kwargs)
    assert len(rc.history) == before


def test_no_cluster_says_how_to_start_one(ipython_dir):
    with pytest.raises(NoClusterError, match="ipmtc start"):
        ipmtc.dynamic_map(square, range(3), progress=False)


@pytest.mark.parametrize("path", ["channel", "applies"])
def test_hundred_thousand_tasks_in_bounded_client_memory(rc, path, monkeypatch):
    if path == "applies":  # engines that cannot dial back get their chunks as ipyparallel applies
        monkeypatch.setenv("IPMTC_DRIVER_IP", "off")
    proc = psutil.Process()
    ipmtc.dynamic_map(noop, range(20_000), client=rc, progress=False)  # warm up
    gc.collect()
    before = proc.memory_info().rss
    h0 = len(rc.history)
    res = ipmtc.dynamic_map(noop, (i for i in range(100_000)), client=rc, progress=False)
    assert len(res) == 100_000 and res[99_999] == 99_999
    del res
    gc.collect()
    growth = proc.memory_info().rss - before
    # results and records of 100k tasks are handed back; the client's own caches are purged
    assert len(rc.results) < 100 and len(rc.metadata) < 100
    assert growth < 80 * 2**20, f"client RSS grew by {growth / 2**20:.0f} MiB"
    ch = Channel.for_client(rc)
    if path == "channel":  # nothing went through ipyparallel, and the channel keeps nothing either
        assert ch is not None and ch.connected == set(rc.ids) and not ch.results
        assert len(rc.history) - h0 < 10
        return
    assert ch is None
    # the hub forgets them too (its purges are sent without waiting: give the last one a moment)
    sent = set(rc.history[h0:])  # this map's chunks
    assert sent
    wait_for(lambda: not sent & set(rc.hub_history()), 10, "the hub to purge this map's chunks")


def slow_flaky(args):
    """Tasks of the second half wait at the gate (until the test has killed its victims)."""
    import os
    import random
    import time
    import uuid

    x, gate, waiting = args
    if gate is not None:  # (engines resolve no globals of this module: the wait is spelled out here)
        mark = os.path.join(waiting, uuid.uuid4().hex)  # one file per task waiting at the gate now
        open(mark, "w").close()
        try:
            deadline = time.monotonic() + 300  # the test opens it long before, or has failed
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            os.remove(mark)
    time.sleep(0.05)
    if random.random() < 0.10:
        raise RuntimeError(f"random failure of task {x}")
    return x * 10


class _Gate:
    """A file the held tasks wait for, and a directory holding one file per task now waiting there."""

    def __init__(self, d):
        self.path, self.waiting = d / "gate", d / "waiting"
        self.waiting.mkdir()

    def args(self) -> tuple[str, str]:
        return str(self.path), str(self.waiting)

    def n_waiting(self) -> int:
        return len(os.listdir(self.waiting))

    def open(self) -> None:
        self.path.touch()


def _kill_engines(pids) -> list[int]:
    """SIGKILL each engine and its nanny; wait until all of them are dead."""
    killed = []
    for v in pids:
        for p in _proc.process_tree(v):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(p)
    assert len(killed) >= len(pids)
    assert not wait_all_dead(killed, timeout_s=30), "SIGKILLed engines still alive"
    return killed


@pytest.mark.parametrize("schedule", [ipmtc.dynamic_map, ipmtc.static_map])
def test_fault_scenario_of_the_study(start_cluster, schedule, tmp_path):
    """10% of attempts raise; 3 engines (and their nannies) are SIGKILLed halfway.

    Halfway by construction, not by time: the second half of the tasks waits at a gate; once every
    engine waits there (so the victims hold unfinished work), the victims are killed, then the gate opens.
    """
    info = start_cluster(8)
    rc = ipmtc.connect(info.profile)
    victims = [info.engines[str(e)]["pid"] for e in rc.ids[:3]]
    n = 320
    gate = _Gate(tmp_path)

    def kill_halfway():
        try:
            wait_for(lambda: gate.n_waiting() == len(rc.ids), 120,
                     lambda: f"every engine ({len(rc.ids)}) at the gate, {gate.n_waiting()} there")
            _kill_engines(victims)
        finally:
            gate.open()  # (also when the kill failed: the map must not hang at the gate)

    killer = Background(kill_halfway)
    killer.start()
    try:
        # static: small chunks so that every engine's share reaches the gated half
        kw = {"chunksize": 5} if schedule is ipmtc.static_map else {}
        items = [(x, *(gate.args() if x >= n // 2 else (None, None))) for x in range(n)]
        res = schedule(slow_flaky, items, client=rc, retries=8, progress=False, **kw)
    finally:
        killer.check()
        rc.close()
    assert list(res) == [x * 10 for x in range(n)]  # every result, correct, in order
    assert len(res._completion) == n  # none duplicated
    assert res.ok and res.engine_losses == 3
    raised = sum(1 for r in res.records for h in r.history if h[4] == "raised")
    assert sum(r.attempts - 1 for r in res.records) == raised  # retries only for exceptions
    assert raised > 0 and sum(r.resubmits for r in res.records) > 0  # lost tasks were resubmitted free
    survivors = {r.engine_id for r in res.records}
    assert len(survivors) >= 5


def sleepy_or_held(args):
    """Sleeps ``x`` s; with a gate, only after the gate has opened (in this test: never)."""
    import os
    import time

    _, x, gate = args  # (the index first: every input, and so every journal key, its own)
    deadline = time.monotonic() + 300
    while gate is not None and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(x)
    return x


def test_all_engines_lost_fails_fast(start_cluster, tmp_path):
    """Both engines are SIGKILLed once the journal records a finished task; the rest wait at a gate
    that never opens (so the map cannot finish first). With restarts off: by default a node's forker
    starts killed engines again (tests/integration/test_elastic.py), and the map would carry on."""
    info = start_cluster(2, engine_restarts=0)
    rc = ipmtc.connect(info.profile)
    gate = _Gate(tmp_path)
    journal = tmp_path / "j.db"

    def kill_all():
        try:
            wait_for(lambda: _journal_ok(journal), 120, "a finished task in the journal")
            _kill_engines([e["pid"] for e in info.engines.values()])
        except BaseException:
            gate.open()  # the kill failed: let the map end rather than hang at the gate
            raise

    killer = Background(kill_all)  # (the gate stays shut: the engines die waiting there)
    items = [(i, 0.1, None if i < 20 else str(gate.path)) for i in range(200)]
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(EnginesLostError, match="all engines are gone") as e:
            ipmtc.dynamic_map(sleepy_or_held, items, client=rc, progress=False, journal=journal)
    finally:
        killer.check()
        rc.close()
    assert time.monotonic() - t0 < 30
    partial = e.value.result
    assert 0 < len(partial) <= 20 and len(partial.undone) == 200 - len(partial)
    assert all(v == 0.1 for v in partial)


def fails_on_3(x):
    if x == 3:
        raise ValueError("three")
    return x


def test_progress_bar_counts_done_failed_and_engines(rc, capsys):
    ipmtc.dynamic_map(fails_on_3, range(40), client=rc, retries=1, progress=True)
    err = capsys.readouterr().err
    assert "ipmtc dynamic" in err and "40/40" in err
    assert "failed=1" in err and "retried=1" in err and f"engines={len(rc.ids)}" in err
    ipmtc.static_map(square, range(10), client=rc, progress=False)
    assert capsys.readouterr().err == ""


def test_a_collected_clients_controller_watch_never_holds_another_map(shared_cluster, rc, monkeypatch):
    """A client dropped with its controller watch running may be collected in the middle of another
    client's map: its finalizer stops the watch without waiting for the watch's thread (a join there
    held the other map's loop for up to a second)."""
    from ipmtc import cluster
    from ipmtc.maps.hubwatch import _WATCHES

    other = cluster.connect(shared_cluster.profile)
    other.wait_for_engines(shared_cluster.n_engines, timeout=30)
    assert list(ipmtc.dynamic_map(abs, [-1, -2], client=other, progress=False)) == [1, 2]
    watch = _WATCHES[other]
    joins = []
    monkeypatch.setattr(watch._thread, "join", lambda *a, **k: joins.append(a))
    other.close()
    del other
    gc.collect()  # as a collection in the middle of rc's next map would
    assert watch._stop.is_set() and joins == []
    wait_for(lambda: not watch._thread.is_alive(), 10, "the watch's thread to end by itself")
    assert list(ipmtc.dynamic_map(abs, [-3], client=rc, progress=False)) == [3]
