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
        cp = subprocess.run([*IPMTC, "add", "--engines", "2", "--profile", "grow"], capture_output=True, text=True,
                            timeout=120)
        assert cp.returncode == 0 and "2 engines added (local" in cp.stdout, cp.stderr
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
