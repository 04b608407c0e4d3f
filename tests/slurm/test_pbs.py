"""PBS/Torque: batch/pbs.sh with a real PBS-style node file and `mpiexec -machinefile`.

No PBS server is packaged for Debian, so the job is simulated the way pbs_mom
starts one: the script runs as a session leader with PBS_JOBID,
PBS_NODEFILE (this host's name once per slot), PBS_O_WORKDIR and Torque's
PBS_WALLTIME in its environment. Detection, the node file, the engine launch
through hydra's `-machinefile` and the job end time are real.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from ._helpers import BATCH, REPO, check_results, engines_per_node


def test_pbs_script_detects_the_job_and_launches_engines_with_mpiexec_machinefile(tmp_path, ipython_dir):
    host = socket.gethostname()
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(f"{host}\n" * 4)  # one line per slot, as PBS writes it
    res_file = tmp_path / "results.json"
    n, samples = 120, 2000
    env = {**os.environ, "PBS_JOBID": "4242.pbs-server", "PBS_NODEFILE": str(nodefile),
           "PBS_O_WORKDIR": str(REPO), "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_WALLTIME": "3600",
           "MTC_ARGS": f"--tasks {n} --samples {samples} --out {res_file}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}
    t0 = time.time()
    cp = subprocess.run(["bash", str(BATCH / "pbs.sh")], env=env, cwd=tmp_path, capture_output=True, text=True,
                        timeout=180, start_new_session=True, stdin=subprocess.DEVNULL)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out
    assert "pbs job 4242.pbs-server: 1 node" in out and "4 slots; launcher mpiexec" in out, out
    assert engines_per_node(out) == {host: 4}, out
    assert re.search(r"^ipmtc: stopped cluster ipmtc-4242 \(\d+ processes\)", out, re.M), out

    pdir = ipython_dir / "profile_ipmtc-4242"
    assert (pdir / "machinefile").read_text().split() == [f"{host}:4"]
    cfg = (pdir / "ipcluster_config.py").read_text()
    assert re.search(r"mpi_args = \[.*'-machinefile', '[^']*/machinefile'\]", cfg), cfg
    assert "mpiexec" in cfg

    data = check_results(res_file, n, samples)
    assert data["summary"]["ok"] == n and data["per_node"] == {host: n}
    # the end time: PBS_WALLTIME counted from the job script's start (its session)
    assert data["job_end_time"] is not None and abs(data["job_end_time"] - (t0 + 3600)) < 30, data["job_end_time"]
    assert re.search(r"^job ends at .* \(in 3\d\d\d s\)", out, re.M), out
