"""Campaigns longer than one allocation: the next batch job, submitted when work is left undone.

A journaled map or ``ipmtc run`` inside a batch job hands out nothing that would not finish before the
job ends (draining); what is left is *undone*. :func:`follow_on` then submits the same batch script
again, to start after this job ends (``sbatch --dependency=afterany:<job>``, ``qsub -W
depend=afterany:<job>``), with the same allocation (nodes, tasks per node, walltime, partition,
account) and ``IPMTC_CAMPAIGN_JOB`` one higher; the next job resumes from the journal. The chain stops
when nothing is undone, or after ``max_jobs`` jobs. ``ipmtc report`` on the journal shows every job
of the campaign (one driver run each).

    ipmtc run tasks.txt --continue-jobs 10          # in the batch script (batch/slurm-campaign.sbatch)
    ipmtc.campaign.follow_on(res, max_jobs=10)      # after a journaled map, in a Python driver
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Mapping
from typing import Any

from ._proc import run
from .errors import ClusterError

JOB_VAR = "IPMTC_CAMPAIGN_JOB"  # this job's number in the campaign (1: the first)


def job_number(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    raw = env.get(JOB_VAR, "1").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def follow_on(undone: Any, max_jobs: int, environ: Mapping[str, str] | None = None) -> str | None:
    """Submit the next job of the campaign when ``undone`` (a count, a list, or a result's ``.undone``) is
    not empty and fewer than ``max_jobs`` jobs ran; its job id, else None (nothing left, or the limit)."""
    env = os.environ if environ is None else environ
    left = getattr(undone, "undone", undone)
    n_left = left if isinstance(left, int) else len(left)
    if n_left <= 0 or job_number(env) >= max_jobs:
        return None
    if env.get("SLURM_JOB_ID"):
        return _slurm_next(env)
    if env.get("PBS_JOBID"):
        return _pbs_next(env)
    raise ClusterError("a follow-on job needs a Slurm or PBS batch job to follow; run this inside one")


def _fields(text: str) -> dict[str, str]:
    """``scontrol -o show job``'s KEY=VALUE pairs (a value runs up to the next `` KEY=``)."""
    # keys look like JobId, AllocNode:Sid, TRES (a value may hold "=": TRES=cpu=2,node=1)
    pairs = re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|$)", text.strip())
    return {m.group(1): m.group(2).strip() for m in pairs}


def _slurm_next(env: Mapping[str, str]) -> str:
    job = env["SLURM_JOB_ID"]
    cp = run(["scontrol", "-o", "show", "job", job], timeout_s=30, env=dict(env))
    f = _fields(cp.stdout)
    command = f.get("Command", "")
    if not command or not os.path.isfile(command.split()[0]):
        raise ClusterError(f"cannot find this job's batch script (scontrol says Command={command!r}); "
                           "submit the next job yourself")
    argv = ["sbatch", "--parsable", f"--dependency=afterany:{job}",
            f"--export=ALL,{JOB_VAR}={job_number(env) + 1}", f"--nodes={f.get('NumNodes', '1').split('-')[0]}"]
    if env.get("SLURM_NTASKS_PER_NODE"):
        argv.append(f"--ntasks-per-node={env['SLURM_NTASKS_PER_NODE']}")
    for key, flag in (("TimeLimit", "--time"), ("Partition", "--partition"), ("Account", "--account"),
                      ("JobName", "--job-name"), ("WorkDir", "--chdir")):
        value = f.get(key, "")
        if value and value not in ("(null)", "UNLIMITED"):
            argv.append(f"{flag}={value}")
    out = f.get("StdOut", "")
    if out and out != "(null)":  # the next job's output beside this one's, under its own job id
        argv.append("--output=" + re.sub(rf"\b{job}\b", "%j", out))
        if job not in out:  # one file for the campaign: appended to, not overwritten
            argv.append("--open-mode=append")
    cp = run([*argv, *shlex.split(command)], timeout_s=60, env=dict(env), check=False)
    if cp.returncode != 0:
        raise ClusterError(f"sbatch refused the follow-on job: {(cp.stderr or cp.stdout).strip()[:300]}")
    return cp.stdout.strip().split(";")[0]


def _pbs_next(env: Mapping[str, str]) -> str:
    # PBS keeps no path of the submitted script in the job's environment: the campaign's template passes it
    script = env.get("IPMTC_CAMPAIGN_SCRIPT", "")
    if not script or not os.path.isfile(script):
        raise ClusterError("under PBS set IPMTC_CAMPAIGN_SCRIPT to the job script's path (batch/pbs.sh shows how)")
    qsub = shutil.which("qsub", path=env.get("PATH")) or "qsub"
    cp = run([qsub, "-W", f"depend=afterany:{env['PBS_JOBID']}", "-V", "-v",
              f"{JOB_VAR}={job_number(env) + 1}", script], timeout_s=60, env=dict(env), check=False)
    if cp.returncode != 0:
        raise ClusterError(f"qsub refused the follow-on job: {(cp.stderr or cp.stdout).strip()[:300]}")
    return cp.stdout.strip()
