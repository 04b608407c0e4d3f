"""A campaign longer than one job: `batch/slurm-campaign.sbatch` with `--time=1` and ~2 minutes of work.

Each job runs what fits before its end (draining), then submits the same script again after itself; the
chain ends when every line is done. Every line must be done exactly once, none killed by the walltime,
and `ipmtc report` on the journal must show one driver run per job.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ipmtc.journal import Journal

from ._helpers import BATCH
from .conftest import Job, record

pytestmark = pytest.mark.slurm


def test_campaign_through_follow_on_jobs(jobs, slurm, tmp_path):
    tasks = tmp_path / "tasks.txt"
    n = 200
    tasks.write_text("".join(f"sleep 0.5; echo line {i}\n" for i in range(n)))  # 100 s of work on 2 engines
    env = slurm.env(MAX_JOBS="6")
    first = jobs.submit(["-N", "1", "--ntasks-per-node=2", "--time=1"], BATCH / "slurm-campaign.sbatch",
                        [str(tasks), "--drain-margin-s", "15"], env=env, name="campaign")
    chain = [first]
    job = first
    while True:
        jobs.wait(job, timeout_s=240)
        out = job.output
        m = list(re.finditer(r"submitted follow-on job (\d+)", out))
        if len(m) < len(chain):
            break
        nxt = Job(job_id=m[-1].group(1), out=job.out, submitted=job.submitted)
        jobs.submitted.append(nxt)  # cancelled at the end if the test fails
        chain.append(nxt)
        job = nxt
    out = first.output
    assert all(j.state == "COMPLETED" for j in chain), [(j.job_id, j.state) for j in chain] + [out[-2000:]]
    assert len(chain) >= 2, f"one job did all the work: the campaign was not tested\n{out[-2000:]}"
    jr = Journal.open(f"{tasks}.journal.db", readonly=True)
    try:
        rows = list(jr.rows())
        runs = jr.runs()
    finally:
        jr.close()
    assert sorted(r["idx"] for r in rows) == list(range(n)), "a line missing or done twice"
    assert {r["outcome"] for r in rows} == {"ok"} and {r["attempts"] for r in rows} == {1}, "a line killed or retried"
    assert len(runs) == len(chain)
    rep = subprocess.run([sys.executable, "-m", "ipmtc", "report", f"{tasks}.journal.db"], capture_output=True,
                         text=True, timeout=60)
    assert rep.returncode == 0 and f"journal, {len(chain)} runs" in rep.stdout, rep.stdout
    record("campaign of 200 x 0.5 s on 2 engines, --time=1", f"{len(chain)} jobs")
