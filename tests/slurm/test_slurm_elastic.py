"""Engines that join and leave across Slurm jobs: a map in a 2-node job grows onto a second job's 2 nodes
(`ipmtc add` there), then the engines of one node are drained mid-map (`ipmtc remove --host`): no task lost,
failed, retried or charged a crash.

The map's tasks wait while a ``hold`` file exists (polled), so the map is still running when the second
job's engines join and when one node's engines are told to leave: no step depends on how fast things are.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ipmtc.cluster import engine_notes

from .._wait import wait_for
from .conftest import Job, record

pytestmark = pytest.mark.slurm
PY = sys.executable

DRIVER = """
import json, os, sys, time
import ipmtc

hold, out = sys.argv[1], sys.argv[2]

def task(args):
    import os, time
    i, hold = args
    deadline = time.monotonic() + 300  # (the test's own waits fail long before)
    while os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.1)  # a polling step of the wait on the hold file
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


def _map_job(jobs, tmp_path: Path, driver_cmd: str, out: Path, name: str) -> tuple[Job, str]:
    """A 2-node job (n1, n2) that starts a cluster and runs ``driver_cmd``; returns once its map started."""
    first = tmp_path / "first.sh"
    first.write_text("#!/bin/bash\nset -e\nexport IPMTC_PROFILE=ipmtc-$SLURM_JOB_ID\n"
                     "trap 'ipmtc stop || true' EXIT\nipmtc start\n"
                     f"{driver_cmd}\n")
    job = jobs.submit(["-N", "2", "--ntasks-per-node=4", "-w", "n1,n2"], first, name=name)
    wait_for(lambda: Path(f"{out}.started").exists() or jobs.poll(job) in ("FAILED", "COMPLETED"), 150,
             "the first job's map to start")
    assert Path(f"{out}.started").exists(), job.output
    return job, f"ipmtc-{job.job_id}"


def _add_job(jobs, slurm, ipython_dir: Path, profile: str, time_limit: str) -> Job:
    """The second job: 2 nodes (the free ones, n3 and n4) written and submitted by `ipmtc add --submit`."""
    sub = subprocess.run([sys.executable, "-m", "ipmtc", "add", "--profile", profile, "--submit", "--nodes", "2",
                          "--engines-per-node", "4", "--time", time_limit], capture_output=True, text=True,
                         timeout=60, env=slurm.env())
    assert sub.returncode == 0, sub.stderr
    m = re.search(r"submitted job (\d+)", sub.stdout)
    assert m, sub.stdout
    job = Job(job_id=m.group(1), out=ipython_dir / f"profile_{profile}" / "log" / f"ipmtc-add-{m.group(1)}.out",
              submitted=time.time())
    jobs.submitted.append(job)  # cancelled at the end if the test fails
    return job


def test_a_map_grows_onto_a_second_job_and_a_node_drains_mid_map(jobs, slurm, tmp_path, ipython_dir):
    hold, out = tmp_path / "hold", tmp_path / "map.json"
    hold.touch()
    driver = tmp_path / "driver.py"
    driver.write_text(f"hold = {str(hold)!r}\n" + DRIVER.replace("hold, out = sys.argv[1], sys.argv[2]",
                                                                  f"out = {str(out)!r}"))
    job_a, profile = _map_job(jobs, tmp_path, f"{PY} {driver}", out, "grow-a")
    # one Python per node: each node's engines are forked by one process (srun's task), not started by srun
    state = _state(ipython_dir, job_a.job_id)
    parents = {}
    for e in state["engines"].values():
        parents.setdefault(e["node"], set()).add(psutil.Process(e["pid"]).ppid())
    assert {n: len(p) for n, p in parents.items()} == {"n1": 1, "n2": 1}, parents
    job_b = _add_job(jobs, slurm, ipython_dir, profile, "10")
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


def test_killed_engines_come_back_until_the_node_is_given_up(jobs, slurm, tmp_path, ipython_dir):
    """SIGKILL of an engine on n2: its node's forker starts it again; past engine_restarts (1 here) the node
    is given up (`ipmtc status` says so) and the cluster carries on with the rest."""
    go = tmp_path / "go"
    script = tmp_path / "restart.sh"
    script.write_text("#!/bin/bash\nset -e\nexport IPMTC_PROFILE=ipmtc-$SLURM_JOB_ID\n"
                      "trap 'ipmtc stop || true' EXIT\nipmtc start --set engine_restarts=1\n"
                      f"for _ in $(seq 1 1500); do [ -e {go} ] && break; sleep 0.2; done\nipmtc status\n")
    job = jobs.submit(["-N", "2", "--ntasks-per-node=2"], script, name="restart")
    profile = None

    def engines_on(node: str) -> dict[int, int]:
        import ipmtc

        rc = ipmtc.connect(profile)
        try:  # an engine just killed may still be listed: its apply fails or waits; asked again next poll
            ids = list(rc.ids)
            here = dict(zip(ids, rc[ids].apply_async(_where).get(timeout=10)))
        except Exception:
            return {}
        finally:
            rc.close()
        return {eid: pid for eid, (n, pid) in here.items() if n == node}

    wait_for(lambda: _state(ipython_dir, job.job_id).get("n_engines") == 4 or jobs.poll(job) == "FAILED", 150,
             lambda: f"4 engines ({job.output[-500:]})")
    profile = f"ipmtc-{job.job_id}"
    first = engines_on("n2")
    assert len(first) == 2, first
    t0 = time.monotonic()
    psutil.Process(next(iter(first.values()))).kill()
    def restarted() -> bool:
        now = engines_on("n2")
        return len(now) == 2 and set(now) != set(first)

    wait_for(restarted, 60, "n2's engine restarted")
    record_s = time.monotonic() - t0
    second = engines_on("n2")
    psutil.Process(next(iter(second.values()))).kill()  # the second death on n2: past engine_restarts=1
    wait_for(lambda: len(engines_on("n2")) == 1, 60, "n2 given up: one engine left there")
    go.touch()
    jobs.wait(job, timeout_s=120)
    assert job.state == "COMPLETED", job.output
    assert "restarts: 1" in job.output and "given up (engines kept dying): n2" in job.output, job.output
    record("SIGKILLed engine back (Slurm, n2)", f"{record_s:.1f} s")


ENDING_DRIVER = """
import json, os, sys, time
import ipmtc

done, out = sys.argv[1], sys.argv[2]

def task(i):
    import os, time
    t0 = time.time()
    time.sleep(1.0)
    return i, os.environ.get("SLURMD_NODENAME"), t0, time.time()

def inputs():  # tasks keep coming until the test says (a file): the map outlives the second job
    i = 0
    while not os.path.exists(done):
        yield i
        i += 1

open(out + ".started", "w").close()
stream = ipmtc.imap(task, inputs(), progress=False, chunksize=1, drain_margin_s=150)
results = [r if isinstance(r, tuple) else str(r) for r in stream]
json.dump({"summary": stream.summary(), "results": results}, open(out, "w"))
"""


def test_an_added_job_near_its_walltime_drains_while_the_first_job_carries_on(jobs, slurm, tmp_path, ipython_dir):
    """A second job (`ipmtc add --submit --time 3`) joins a running map. Its engines note their job's end, and the
    map hands them nothing that would not finish 150 s (its drain margin here) before it -- at the latest
    ~30 s into the job, before Slurm's walltime warning (SIGTERM 60 s before the end, sent up to 60 s early)
    could come; at that warning they leave. The job completes, no task is killed by the walltime (no loss,
    failure, retry or crash), and the first job's engines carry on with the map."""
    done, out = tmp_path / "done", tmp_path / "map.json"
    driver = tmp_path / "driver.py"
    driver.write_text(ENDING_DRIVER)
    job_a, profile = _map_job(jobs, tmp_path, f"{PY} {driver} {done} {out}", out, "ending-a")
    job_b = _add_job(jobs, slurm, ipython_dir, profile, "3")

    def b_notes() -> list[dict]:
        notes = engine_notes(ipython_dir / f"profile_{profile}").values()
        return [n for n in notes if n.get("node") in ("n3", "n4")]

    wait_for(lambda: len(b_notes()) == 8 or jobs.poll(job_b) not in ("PENDING", "RUNNING"), 150,
             lambda: f"the second job's 8 engines ({job_b.output[-800:]})")
    ends = {n.get("ends_at") for n in b_notes()}
    assert len(ends) == 1 and None not in ends, ends
    b_end = float(ends.pop())
    jobs.wait(job_b, timeout_s=300)  # its walltime (3 min) ends it at the latest
    b_done = time.time()
    assert job_b.state == "COMPLETED", (job_b.state, job_b.output)
    done.touch()  # (tasks already on the first job's engines run on past b_done: each takes 1 s)
    jobs.wait(job_a, timeout_s=120)
    assert job_a.state == "COMPLETED", job_a.output
    data = json.loads(out.read_text())
    s = data["summary"]
    assert (s["failed"], s["retries"], s["crashes"], s["engine_losses"], s["undone"]) == (0, 0, 0, 0, 0), s
    on_b = [r for r in data["results"] if r[1] in ("n3", "n4")]
    assert {r[1] for r in data["results"]} == {"n1", "n2", "n3", "n4"}, "the map did not grow onto the second job"
    # the per-engine drain, not the walltime warning, ended their work (the warning comes 60-120 s before the end)
    assert max(start for _, _, start, _ in on_b) < b_end - 125, (b_end, max(r[2] for r in on_b))
    assert max(end for _, _, _, end in on_b) <= b_done
    assert max(end for _, node, _, end in data["results"] if node in ("n1", "n2")) > b_done, "first job stopped"
    assert "left" in job_b.output, job_b.output


def _where():
    import os

    return os.environ.get("SLURMD_NODENAME"), os.getpid()
