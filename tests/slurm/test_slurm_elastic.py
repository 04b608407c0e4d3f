"""Engines that join and leave across Slurm jobs: a map in a 2-node job grows onto a second job's 2 nodes
(`ipmtc add` there), then the engines of one node are drained mid-map (`ipmtc remove --host`): no task lost,
failed, retried or charged a crash.

The map's tasks wait while a ``hold`` file exists (polled), so the map is still running when the second
job's engines join and when one node's engines are told to leave: no step depends on how fast things are.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .._wait import wait_for

pytestmark = pytest.mark.slurm
PY = sys.executable

DRIVER = """
import json, os, sys, time
import ipmtc

hold, out = sys.argv[1], sys.argv[2]

def task(args):
    import os, time
    i, hold = args
    while os.path.exists(hold):
        time.sleep(0.1)
    time.sleep(0.2)
    return i, os.environ.get("SLURMD_NODENAME")

open(out + ".started", "w").close()
res = ipmtc.dynamic_map(task, [(i, hold) for i in range(240)], progress=False, chunksize=1)
json.dump({"summary": res.summary(), "results": [r if isinstance(r, tuple) else str(r) for r in res]},
          open(out, "w"))
"""


def _state(ipython_dir: Path, job_id: str) -> dict:
    path = ipython_dir / f"profile_ipmtc-{job_id}" / "security" / "ipmtc-cluster.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_a_map_grows_onto_a_second_job_and_a_node_drains_mid_map(jobs, slurm, tmp_path, ipython_dir):
    hold, out = tmp_path / "hold", tmp_path / "map.json"
    hold.touch()
    driver = tmp_path / "driver.py"
    driver.write_text(f"hold = {str(hold)!r}\n" + DRIVER.replace("hold, out = sys.argv[1], sys.argv[2]",
                                                                  f"out = {str(out)!r}"))
    first = tmp_path / "first.sh"
    first.write_text("#!/bin/bash\nset -e\nexport IPMTC_PROFILE=ipmtc-$SLURM_JOB_ID\n"
                     "trap 'ipmtc stop || true' EXIT\nipmtc start\n"
                     f"{PY} {driver}\n")
    job_a = jobs.submit(["-N", "2", "--ntasks-per-node=4", "-w", "n1,n2"], first, name="grow-a")
    wait_for(lambda: Path(f"{out}.started").exists() or jobs.poll(job_a) in ("FAILED", "COMPLETED"), 150,
             "the first job's map to start")
    assert Path(f"{out}.started").exists(), job_a.output
    profile = f"ipmtc-{job_a.job_id}"
    second = tmp_path / "second.sh"
    second.write_text(f"#!/bin/bash\nexec ipmtc add --profile {profile} --foreground\n")
    job_b = jobs.submit(["-N", "2", "--ntasks-per-node=4", "-w", "n3,n4"], second, name="grow-b")
    wait_for(lambda: _state(ipython_dir, job_a.job_id).get("n_engines") == 16, 150,
             lambda: f"16 engines (first job: {job_a.output[-800:]}; second job: {job_b.output[-800:]})")
    # n4's engines leave while every task still waits on the hold file
    rm = subprocess.run([sys.executable, "-m", "ipmtc", "remove", "--host", "n4", "--no-wait", "--profile", profile],
                        capture_output=True, text=True, timeout=60, env=slurm.env())
    assert rm.returncode == 0, rm.stderr
    hold.unlink()
    jobs.wait(job_a, timeout_s=240)
    jobs.wait(job_b, timeout_s=120)
    assert job_a.state == "COMPLETED", job_a.output
    data = json.loads(out.read_text())
    s = data["summary"]
    assert sorted(i for i, _ in data["results"]) == list(range(240))
    assert (s["failed"], s["retries"], s["crashes"], s["engine_losses"], s["undone"]) == (0, 0, 0, 0, 0), s
    assert {node for _, node in data["results"]} == {"n1", "n2", "n3", "n4"}, "the map did not grow"
    assert "engines added (slurm job" in job_b.output and "left" in job_b.output, job_b.output
