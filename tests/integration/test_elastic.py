"""Engines that come back: a SIGKILLed engine is forked again on its node; a node that keeps killing is given up.

Local engines are forked by one process per node (the same forker srun and mpiexec start, one per node):
it restarts an engine that died by a signal with the same number (cores, GPUs), up to the preset's
``engine_restarts``, and notes it for ``ipmtc status``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import ipmtc
from ipmtc import cluster

from .._wait import wait_for
from ..conftest import stop_and_check

IPMTC = [sys.executable, "-m", "ipmtc"]


def _cores() -> str | None:
    import os

    return os.environ.get("IPMTC_ENGINE_CORES")


def _pids(rc) -> dict[int, int]:
    return dict(zip(rc.ids, rc[:].apply_sync(os.getpid)))


def test_a_killed_engine_is_forked_again_and_status_shows_it(ipython_dir):
    info = cluster.start(profile="elastic", engines=2, flags={"launcher": "local", "engine_restarts": 2})
    try:
        rc = ipmtc.connect("elastic")
        try:
            before = _pids(rc)
            cores_before = sorted(rc[:].apply_sync(_cores))
            victim = before[rc.ids[0]]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: len(rc.ids) == 2 and set(rc.ids) != set(before), 30,
                     lambda: f"2 engines again after the kill (now {rc.ids})")
            after = _pids(rc)
            assert victim not in after.values() and len(set(after.values())) == 2
            assert sorted(rc[:].apply_sync(_cores)) == cores_before  # the same cores as the engine it replaces
            res = ipmtc.dynamic_map(abs, range(-20, 20), client=rc, progress=False)
            assert sorted(res) == sorted(abs(i) for i in range(-20, 20))
        finally:
            rc.close()
        st = subprocess.run([*IPMTC, "status", "--profile", "elastic"], capture_output=True, text=True, timeout=60)
        assert st.returncode == 0 and "restarts: 1" in st.stdout, st.stdout
    finally:
        stop_and_check(info)


def test_a_node_that_keeps_killing_engines_is_given_up(ipython_dir):
    info = cluster.start(profile="giveup", engines=2, flags={"launcher": "local", "engine_restarts": 1})
    try:
        rc = ipmtc.connect("giveup")
        try:
            first = _pids(rc)
            os.kill(max(first.values()), signal.SIGKILL)
            wait_for(lambda: len(rc.ids) == 2 and set(rc.ids) != set(first), 30, "the first kill's replacement")
            os.kill(max(_pids(rc).values()), signal.SIGKILL)
            wait_for(lambda: len(rc.ids) == 1, 30, "the second kill to leave one engine")
            notes = list((Path(info.profile_dir) / "log").glob("ipmtc-restarts-*.json"))
            assert notes and json.loads(notes[0].read_text())["given_up"] is True
        finally:
            rc.close()
        st = subprocess.run([*IPMTC, "status", "--profile", "giveup"], capture_output=True, text=True, timeout=60)
        assert "given up" in st.stdout, st.stdout
    finally:
        stop_and_check(info)


def _nap(x):
    import time

    time.sleep(0.05)
    return x


def test_add_to_a_running_cluster_and_remove_mid_map_without_loss(ipython_dir):
    info = cluster.start(profile="grow", engines=2, flags={"launcher": "local"})
    try:
        # two adds at once (two jobs' scripts, say): neither's record in the state file is lost
        adders = [subprocess.Popen([*IPMTC, "add", "--engines", "1", "--profile", "grow"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for a in adders:
            out, err = a.communicate(timeout=120)
            assert a.returncode == 0 and "1 engine added (local" in out, (out, err)
        state = cluster.find("grow")
        assert state.n_engines == 4 and len(state.added) == 2, (state.n_engines, state.added)
        rc = ipmtc.connect("grow")
        try:
            wait_for(lambda: len(rc.ids) == 4, 30, "4 engines")
            st = cluster.status("grow")
            assert st["engines"] == 4 and len(st["origins"]) == 2, st["origins"]
            # a map in progress; two engines leave while it runs: no loss, no failure, no retry
            remover = subprocess.Popen([*IPMTC, "remove", "--engines", "2", "--profile", "grow"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                res = ipmtc.dynamic_map(_nap, range(400), client=rc, progress=False)
                out, err = remover.communicate(timeout=120)
            finally:
                if remover.poll() is None:
                    remover.kill()
                    remover.wait()
            assert remover.returncode == 0 and "left" in out, err
            s = res.summary()
            assert sorted(res) == list(range(400))
            assert (s["failed"], s["retries"], s["crashes"], s["engine_losses"]) == (0, 0, 0, 0), s
            wait_for(lambda: len(rc.ids) == 2, 30, "2 engines after the removal")
        finally:
            rc.close()
    finally:
        stop_and_check(info)


def _pid_after(x: float) -> int:
    import os
    import time

    time.sleep(x)
    return os.getpid()


def test_engines_of_a_job_ending_soon_get_no_task_others_carry_on(ipython_dir):
    """Each engine notes its job's end; a map gives an engine nothing it could not finish ``drain_margin_s``
    before that end (the per-engine drain), while the engines of longer jobs carry on; a map left with only such
    engines ends with the rest undone, as at its own job's end."""
    import time

    info = cluster.start(profile="ends", engines=2, flags={"launcher": "local"})
    try:
        def add(ends_at: float) -> None:
            env = {**os.environ, "IPMTC_JOB_END_TIME": f"{ends_at:.0f}"}
            cp = subprocess.run([*IPMTC, "add", "--engines", "1", "--profile", "ends"], capture_output=True,
                                text=True, timeout=120, env=env)
            assert cp.returncode == 0, cp.stderr

        add(time.time() + 3600)  # a job with an hour left: serves
        add(time.time() + 10)  # a job ending within the 30 s drain margin: serves nothing
        rc = ipmtc.connect("ends")
        try:
            wait_for(lambda: len(rc.ids) == 4, 30, "4 engines")
            notes = cluster.engine_notes(Path(info.profile_dir))
            ending = [int(i) for i, n in notes.items() if n.get("ends_at") and n["ends_at"] < time.time() + 60]
            hour = [int(i) for i, n in notes.items() if n.get("ends_at") and n["ends_at"] > time.time() + 600]
            assert len(ending) == 1 and len(hour) == 1, notes
            pids = _pids(rc)
            res = ipmtc.dynamic_map(_pid_after, [0.01] * 200, client=rc, progress=False)
            s = res.summary()
            assert res.ok and (s["failed"], s["retries"], s["engine_losses"]) == (0, 0, 0), s
            used = set(res)
            assert pids[ending[0]] not in used, "the engine whose job ends soon got a task"
            assert pids[hour[0]] in used and len(used) == 3, (used, pids)
            only_ending = ipmtc.dynamic_map(_pid_after, [0.01] * 5, client=rc[ending], progress=False)
            assert not only_ending.ok and len(only_ending.undone) == 5 and not only_ending.failed
        finally:
            rc.close()
    finally:
        stop_and_check(info)
