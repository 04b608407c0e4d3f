"""Real controller and engines: local and MPI (mpich wheel) launchers, status, stop, faults."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

import ipmtc
from ipmtc import _proc, cluster
from ipmtc.errors import ClusterRunningError, NoClusterError, StartupError

from .._wait import wait_for
from ..conftest import processes_with_env, wait_all_dead


def _square(x):
    return x * x


@pytest.mark.parametrize("launcher", ["local", "mpiexec", "mpiexec-ranks"])
@pytest.mark.parametrize("n", [2, 8])
def test_start_status_map_stop(start_cluster, launcher, n):
    ranks_asked = launcher == "mpiexec-ranks"
    launcher = launcher.split("-")[0]
    info = start_cluster(n, launcher=launcher, **({"mpi_engines": True} if ranks_asked else {}))
    assert info.n_engines == n and info.launcher == launcher
    assert len(info.engines) == n and info.startup_s > 0
    st = cluster.status(info.profile)
    assert st["running"] and st["engines"] == n
    assert st["engines_per_host"] == {socket.gethostname(): n}
    assert "key" not in json.dumps(st).lower()  # no secrets in status

    rc = ipmtc.connect(info.profile)
    try:
        pids = rc[:].apply_sync(os.getpid)
        assert len(set(pids)) == n
        assert rc.load_balanced_view().map_sync(_square, range(50)) == [x * x for x in range(50)]
        if launcher == "mpiexec":
            ranks = sorted(int(e["rank"]) for e in info.engines.values())
            # mpi_engines: every engine an MPI rank of one mpiexec; else one rank per node forks its engines
            assert ranks == (list(range(n)) if ranks_asked else [0] * n)
    finally:
        rc.close()
    _, stopped = cluster.stop(info.profile)
    assert stopped >= 1 + 2 * n  # controller, engines and their nannies
    assert not wait_all_dead(info.pids + info.launcher_pids)
    with pytest.raises(NoClusterError):  # idempotent: a second stop finds nothing, says so
        cluster.stop(info.profile)


def _engine_facts():
    import os
    import random

    import numpy
    import psutil

    me = psutil.Process()
    return {"pid": os.getpid(), "parent": me.ppid(), "draw": (random.random(), numpy.random.random()),
            "children": [" ".join(c.cmdline()) for c in me.children()]}


def test_local_engines_are_forked_from_one_process_and_independent(start_cluster):
    """One launcher process forks the engines and their nannies; each engine draws its own random numbers."""
    info = start_cluster(4)
    rc = ipmtc.connect(info.profile)
    try:
        facts = rc[:].apply_sync(_engine_facts)
        assert len({f["parent"] for f in facts}) == 1  # one forking parent...
        assert facts[0]["parent"] in info.launcher_pids  # ...which is ipyparallel's engine launcher process
        # every fork draws its own numbers (Python re-seeds `random`; numpy is first imported after the fork)
        assert len({f["draw"][0] for f in facts}) == 4 and len({f["draw"][1] for f in facts}) == 4
        for f in facts:  # the nanny is a fork too, not a fresh `python -m ipyparallel.engine.nanny`
            assert len(f["children"]) == 1 and "ipyparallel.engine.nanny" not in f["children"][0]
        victim = facts[0]["pid"]
        nanny = [p for p in _proc.process_tree(victim) if p != victim]
        os.kill(victim, signal.SIGKILL)  # the engine alone: its nanny must notice, report it and exit
        wait_for(lambda: len(rc.ids) == 3 and not any(_proc.alive(p) for p in nanny), 30,
                 lambda: f"the engine unregistered and its nanny gone (engines {rc.ids}, nanny {nanny})")
        assert _proc.alive(facts[0]["parent"])  # the forking parent waits on for the others
        assert sorted(rc[:].apply_sync(os.getpid)) == sorted(f["pid"] for f in facts[1:])
    finally:
        rc.close()


def test_two_clusters_side_by_side(start_cluster):
    a = start_cluster(2, profile="alpha")
    b = start_cluster(3, profile="beta")
    assert {c.profile for c in cluster.list_clusters() if c.running} == {"alpha", "beta"}
    ra, rb = ipmtc.connect("alpha"), ipmtc.connect("beta")
    try:
        pa, pb = set(ra[:].apply_sync(os.getpid)), set(rb[:].apply_sync(os.getpid))
        assert len(pa) == 2 and len(pb) == 3 and not pa & pb
        # their connection files name different ports: nothing shared
        fa = json.loads((Path(a.profile_dir) / "security/ipcontroller-client.json").read_text())
        fb = json.loads((Path(b.profile_dir) / "security/ipcontroller-client.json").read_text())
        assert fa["registration"] != fb["registration"]
        cluster.stop("alpha")
        assert len(rb[:].apply_sync(os.getpid)) == 3  # beta unaffected
    finally:
        ra.close()
        rb.close()


def _pmi_rank() -> int:
    import os

    return int(os.environ.get("PMI_RANK", -1))


def test_sigkill_of_mpi_engines_leaves_the_others_working(start_cluster):
    """hydra SIGKILLs a node's ranks when one dies by a signal (a race): two kills, none spread.
    (MPI engines: one rank each; by default a node's engines are forked by one rank, see test_elastic.)"""
    info = start_cluster(4, launcher="mpiexec", mpi_engines=True)
    rc = ipmtc.connect(info.profile)
    try:
        by_rank = {r: e for e, r in zip(rc.ids, rc[:].apply_sync(_pmi_rank))}
        assert sorted(by_rank) == [0, 1, 2, 3]
        engines = {eid: info.engines[str(eid)]["pid"] for eid in rc.ids}
        # hydra's child for each rank: the small parent of ipmtc.engine that forked the engine
        rank_procs = {eid: psutil.Process(pid).ppid() for eid, pid in engines.items()}
        for n, rank in enumerate((0, 2), start=1):  # rank 0 also holds mpiexec's stdin
            victim_id = by_rank[rank]
            victim = engines[victim_id]
            for p in _proc.process_tree(victim):  # the engine and its nanny
                os.kill(p, signal.SIGKILL)
            # the rank's process has ended (hydra reaps the first one, and would spread the kill from there;
            # a later one it leaves a zombie), and the hub has unregistered the engine
            wait_for(lambda pid=rank_procs[victim_id]: not _proc.alive(pid), 30, f"rank {rank}'s process to end")
            wait_for(lambda eid=victim_id: eid not in rc.ids, 30, f"engine {victim_id} (rank {rank}) to unregister")
            survivors = [e for e in engines if e in rc.ids]
            assert len(survivors) == 4 - n, rc.ids
            assert all(_proc.alive(engines[e]) and _proc.alive(rank_procs[e]) for e in survivors), \
                "the kill spread to other ranks"
        mpiexec_pid = info.launcher_pids[1]
        assert _proc.alive(mpiexec_pid), "mpiexec took the other ranks down"
        assert sorted(rc.load_balanced_view().map_sync(_square, range(30))) == sorted(x * x for x in range(30))
        assert sorted(rc[:].apply_sync(os.getpid)) == sorted(engines[e] for e in survivors)
        assert sorted(rc.ids) == sorted(survivors)
        assert all(_proc.alive(engines[e]) and _proc.alive(rank_procs[e]) for e in survivors), \
            "a surviving rank died after the kills"
    finally:
        rc.close()


def _engine_settings():
    from ipyparallel.engine.app import IPEngine

    e = IPEngine.instance()
    return {"hb_period_ms": e.hb_check_period - 500, "timeout": e.timeout,
            "max_heartbeat_misses": e.max_heartbeat_misses}


def _wait_for_file(path: str) -> str:
    """A task that ends once ``path`` exists (the test holds tasks assigned while it looks at the queues)."""
    import os
    import time

    deadline = time.monotonic() + 120  # the test creates it long before, or has failed
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return path


def _held_tasks_state(rc, n_tasks: int, gate: Path, condition, what: str) -> dict:
    """Submit ``n_tasks`` tasks that wait for ``gate`` and wait until the hub's queue status meets
    ``condition(unassigned, assigned)``; then open the gate and collect them. Returns that status."""
    ar = rc.load_balanced_view().map_async(_wait_for_file, [str(gate)] * n_tasks)
    seen: dict = {}

    def met() -> bool:
        q = rc.queue_status()
        seen.clear()
        seen.update(unassigned=q["unassigned"], assigned=sum(q[e]["queue"] + q[e]["tasks"] for e in rc.ids))
        return condition(seen["unassigned"], seen["assigned"])

    try:
        wait_for(met, 30, lambda: f"{what} (the hub says {seen})")
    finally:
        gate.touch()
        ar.get(timeout=60)
    return seen


def test_generated_settings_are_in_effect(start_cluster, tmp_path):
    info = start_cluster(2, heartbeat_period_ms=700, engine_timeout_s=42, engine_heartbeat_misses=7,
                         hwm=0, scheme="lru", task_db="none")
    rc = ipmtc.connect(info.profile)
    try:
        for s in rc[:].apply_sync(_engine_settings):  # the controller told engines its heartbeat
            assert s == {"hb_period_ms": 700, "timeout": 42.0, "max_heartbeat_misses": 7}
        log = "".join(p.read_text() for p in (Path(info.profile_dir) / "log").glob("ipcontroller*.log"))
        assert "Task scheduler started [lru]" in log
        # hwm=0: the scheduler hands every task out at once, none waits unassigned (the tasks wait
        # for a file meanwhile, so none finishes while the queues are looked at)
        _held_tasks_state(rc, 8, tmp_path / "gate", lambda unassigned, assigned: unassigned == 0 and assigned == 8,
                          "all 8 tasks assigned at once")
        with pytest.raises(Exception, match="NoDB"):  # task_db none: the hub keeps no records
            rc.db_query({"msg_id": {"$ne": ""}}, keys=["msg_id"])
    finally:
        rc.close()


def test_hwm_1_keeps_tasks_unassigned(start_cluster, tmp_path):
    info = start_cluster(2)  # dynamic preset: hwm=1: one task per engine, the rest wait in the scheduler
    rc = ipmtc.connect(info.profile)
    try:
        _held_tasks_state(rc, 8, tmp_path / "gate", lambda unassigned, assigned: (unassigned, assigned) == (6, 2),
                          "one task on each of the 2 engines, 6 unassigned")
    finally:
        rc.close()


def test_profile_permissions(start_cluster):
    info = start_cluster(2)
    pdir = Path(info.profile_dir)
    assert pdir.stat().st_mode & 0o777 == 0o700
    assert (pdir / "security").stat().st_mode & 0o777 == 0o700
    for f in (pdir / "security").glob("*.json"):
        assert f.stat().st_mode & 0o777 == 0o600, f
    text = (pdir / "ipcontroller_config.py").read_text()
    assert "HubFactory" not in text and "c.HeartMonitor.period = 100" in text


def test_start_while_running_refuses(start_cluster):
    start_cluster(2, profile="busy")
    with pytest.raises(ClusterRunningError, match="already running"):
        cluster.start(engines=2, profile="busy", flags={"launcher": "local"})
    assert cluster.status("busy")["engines"] == 2  # the running one is untouched


def test_startup_timeout_leaves_nothing_running(ipython_dir):
    t0 = time.monotonic()
    with pytest.raises(StartupError) as e:
        cluster.start(engines=6, profile="tooslow", flags={"launcher": "local", "start_timeout_s": 0.5})
    msg = str(e.value)
    assert re.search(r"only \d/6 engines registered within 0.5 s", msg)
    assert "nothing was left running" in msg and "hint:" in msg
    assert time.monotonic() - t0 < 30
    assert not wait_all_dead(processes_with_env(f"IPYTHONDIR={ipython_dir}"))
    with pytest.raises(NoClusterError):
        cluster.status("tooslow")


def test_stale_cluster_is_cleaned_on_next_start(start_cluster):
    info = start_cluster(2, profile="phoenix")
    os.kill(info.controller_pid, signal.SIGKILL)
    assert wait_all_dead([info.controller_pid]) == []
    assert not cluster.status("phoenix")["running"]
    info2 = start_cluster(2, profile="phoenix")  # the dead one's engines are stopped first
    assert info2.running
    assert not wait_all_dead(info.pids, timeout_s=5)


def test_connect_finds_the_jobs_cluster(start_cluster, monkeypatch):
    start_cluster(2, profile="ipmtc-4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", socket.gethostname())
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2")
    rc = ipmtc.connect()
    try:
        assert len(rc.ids) == 2
    finally:
        rc.close()
