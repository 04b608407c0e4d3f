"""job_end_time: IPMTC_JOB_END_TIME, Slurm (SLURM_JOB_END_TIME, squeue) and PBS (qstat, PBS_WALLTIME).

squeue and qstat are replaced by small scripts on a private PATH; the real
Slurm is exercised in tests/slurm. Every lookup fails soft (None) and fast.
"""
from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from ipmtc import allocation
from ipmtc.allocation import job_end_time
from ipmtc.errors import AllocationError


def _bin(tmp_path: Path, **scripts: str) -> str:
    """A directory holding executable shell scripts ``name -> body``; returns it as a PATH.

    The PATH holds nothing else, so the bodies use shell builtins only (echo, printf, exec).
    """
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        f = d / name
        f.write_text("#!/bin/sh\n" + body + "\n")
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return str(d)


def _local(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def test_not_in_a_job():
    assert job_end_time({}) is None
    assert job_end_time({"SLURM_JOB_ID": "7", "IPMTC_ALLOCATION": "local"}) is None


def test_ipmtc_job_end_time_overrides_everything(tmp_path):
    path = _bin(tmp_path, squeue="echo 2030-01-02T03:04:05")
    env = {"PATH": path, "SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1", "IPMTC_JOB_END_TIME": "1234.5"}
    assert job_end_time(env) == 1234.5
    assert job_end_time({**env, "IPMTC_JOB_END_TIME": "none"}) is None
    with pytest.raises(AllocationError, match="IPMTC_JOB_END_TIME='soon'"):
        job_end_time({"IPMTC_JOB_END_TIME": "soon"})


def test_slurm_job_end_time_variable_wins_over_squeue(tmp_path):
    path = _bin(tmp_path, squeue="exit 1")
    assert job_end_time({"PATH": path, "SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1900000000"}) == 1900000000.0


def test_squeue_end_time_is_local_time(tmp_path):
    args = tmp_path / "args"
    path = _bin(tmp_path, squeue=f'echo "$@" > {args}; echo 2030-01-02T03:04:05')
    assert job_end_time({"PATH": path, "SLURM_JOB_ID": "77"}) == _local("2030-01-02T03:04:05")
    assert args.read_text().split() == ["-h", "-j", "77", "-o", "%e"]


@pytest.mark.parametrize("answer", ["N/A", "Unknown", "NONE", "", "garbage"])
def test_squeue_without_an_end_time(tmp_path, answer):
    path = _bin(tmp_path, squeue=f"echo '{answer}'")
    assert job_end_time({"PATH": path, "SLURM_JOB_ID": "7"}) is None


@pytest.mark.parametrize("body", ["echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", None])
def test_squeue_failing_or_missing_is_none(tmp_path, body):
    path = _bin(tmp_path, **({"squeue": body} if body else {}))
    assert job_end_time({"PATH": path, "SLURM_JOB_ID": "7"}) is None


def test_squeue_that_hangs_is_none_quickly(tmp_path, monkeypatch):
    monkeypatch.setattr(allocation, "_END_TIME_CMD_TIMEOUT_S", 0.5)
    path = _bin(tmp_path, squeue="exec sleep 30")
    t0 = time.monotonic()
    assert job_end_time({"PATH": path, "SLURM_JOB_ID": "7"}) is None
    assert time.monotonic() - t0 < 20  # the timeout ended it, not squeue (30 s)


PBS_PRO = """Job Id: 42.server
    Job_Name = mtc
    resources_used.walltime = 00:10:00
    Resource_List.walltime = 02:00:00
    stime = Wed Jan  2 03:04:05 2030
"""
TORQUE = """Job Id: 42.server
    Resource_List.walltime = 01:00:00
    start_time = 1900000000
    Walltime.Remaining = 1800
"""
TORQUE_EPOCH = """Job Id: 42.server
    Resource_List.walltime = 01:00:00
    start_time = 1900000000
"""
USED_ONLY = """Job Id: 42.server
    Resource_List.walltime = 1:00:00
    resources_used.walltime = 00:20:00
"""


def test_qstat_pbs_pro_start_plus_walltime(tmp_path):
    path = _bin(tmp_path, qstat=f"printf '%s' '{PBS_PRO}'")
    assert job_end_time({"PATH": path, "PBS_JOBID": "42.server"}) == _local("2030-01-02T03:04:05") + 7200


def test_qstat_torque_remaining_and_start_time(tmp_path):
    path = _bin(tmp_path, qstat=f"printf '%s' '{TORQUE}'")
    t0 = time.time()
    got = job_end_time({"PATH": path, "PBS_JOBID": "42"})
    assert t0 + 1800 <= got <= time.time() + 1800  # "now" (read in between) + the seconds remaining
    path = _bin(tmp_path, qstat=f"printf '%s' '{TORQUE_EPOCH}'")
    assert job_end_time({"PATH": path, "PBS_JOBID": "42"}) == 1900000000 + 3600


def test_qstat_without_start_uses_the_walltime_used(tmp_path):
    path = _bin(tmp_path, qstat=f"printf '%s' '{USED_ONLY}'")
    t0 = time.time()
    got = job_end_time({"PATH": path, "PBS_JOBID": "42"})
    assert t0 + 2400 <= got <= time.time() + 2400  # "now" (read in between) + limit - used


_JOB_SCRIPT = """
import json, os, sys, time, psutil
from ipmtc.allocation import job_end_time
time.sleep(0.3)  # the job script started a while before ipmtc asks
env = {"PATH": sys.argv[1], "PBS_JOBID": "42", "PBS_WALLTIME": "3600"}
print(json.dumps([job_end_time(env), psutil.Process().create_time()]))
"""


def test_pbs_walltime_variable_counts_from_the_job_session(tmp_path):
    path = _bin(tmp_path)  # no qstat on the compute node
    # PBS starts the job script as a session leader: so does this test
    out = subprocess.run([sys.executable, "-c", _JOB_SCRIPT, path], capture_output=True, text=True,
                         check=True, start_new_session=True, timeout=60).stdout
    got, leader_start = json.loads(out)
    assert got == leader_start + 3600
    # asked from a child of the job script: still the job's start, not the child's
    got_here = job_end_time({"PATH": path, "PBS_JOBID": "42", "PBS_WALLTIME": "3600"})
    assert got_here is not None and got_here <= psutil.Process().create_time() + 3600
    # qstat that fails: the variable still answers
    path = _bin(tmp_path, qstat="exit 2")
    assert job_end_time({"PATH": path, "PBS_JOBID": "42", "PBS_WALLTIME": "60"}) is not None
    assert job_end_time({"PATH": path, "PBS_JOBID": "42"}) is None


@pytest.mark.parametrize("text, seconds", [("01:00:00", 3600), ("30", 30), ("5:00", 300), ("1:02:03:04", 93784),
                                           ("2-01:00:00", 176400), ("x", None), ("", None), ("1:x", None)])
def test_parse_walltime(text, seconds):
    assert allocation._parse_walltime(text) == seconds


def test_session_leader_outside_the_pid_namespace_uses_the_oldest_visible_ancestor():
    """In a container the job's session leader may be invisible (getsid says 0), as in CI."""
    script = ("import json, os, psutil\n"
              "from ipmtc.allocation import _session_start\n"
              "me = psutil.Process()\n"
              "print(json.dumps([os.getsid(0), _session_start(), me.parent().create_time(), me.create_time()]))\n")
    # sh (PID 1 of a new namespace, its session leader outside) starts Python a while later
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
           'sleep 0.3; "$0" -c "$1"', sys.executable, script]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, f"unshare (root, as CI runs) failed: {cp.stderr.strip()}"
    sid, start, sh_start, py_start = json.loads(cp.stdout)
    assert sid == 0
    assert start == sh_start and start < py_start
