"""A mixed workload on a real local Slurm (4 fake nodes x 4 cores): single-core and 8-rank MPI tasks.

200 single-core 1 s tasks + 20 eight-rank 5 s MPI tasks (a C program built with the mpich wheel's
``mpicc``: MPI_Init, barrier, sleep, barrier, MPI_Finalize), run two ways in the same run:

- **packed**: one job of all 4 nodes, ``ipmtc start`` + ``ipmtc run`` of one file holding both kinds
  (``[ranks=8] ./mpisleep 5`` lines): ipmtc keeps the slots, wide lines first, narrow ones backfill;
- **split** (the baseline): the MPI tasks as a Slurm job array (20 jobs of ``-N 2 -n 8``, each ``srun
  ./mpisleep 5``) beside a plain ``ipmtc run`` of the single-core tasks in a job of 2 nodes, all submitted
  at once: Slurm shares the 4 nodes between them.

Makespan: packed, the ``ipmtc run`` itself (first command started to last ended, from its journal) and the
whole job (submit to end, with the cluster's start-up and stop); split, submit to the last job's end.
Lower bound: max(total core-seconds / 16 cores, the longest task) = max(1000 / 16, 5) = 62.5 s.
Target: packed run >= 90% of the bound (bound / makespan).

Needs root (it starts the project's local Slurm with ``tests/slurm/harness``, or uses ``--slurm-conf``).

    python benchmarks/packing.py [--singles 200] [--mpi 20] [--slurm-conf PATH]
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import HERE, PY, machine, machine_line, md_table, parser, venv_bin, write_outputs

HARNESS = HERE.parent / "tests" / "slurm" / "harness"
NODES, CPUS = 4, 4
MPI_C = r"""
#include <mpi.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Barrier(MPI_COMM_WORLD);
    usleep((useconds_t)(atof(argv[1]) * 1e6));
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
"""


def _env(conf: str, ipd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "IPMTC_", "PBS_", "LSB_"))}
    env.update(SLURM_CONF=conf, IPYTHONDIR=str(ipd), PATH=f"{Path(PY).parent}:{env.get('PATH', '/usr/bin:/bin')}")
    return env


def _sbatch(env: dict[str, str], args: list[str], cwd: Path) -> str:
    cp = subprocess.run(["sbatch", "--parsable", "--export=ALL", *args], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=60, check=True)
    return cp.stdout.strip().split(";")[0]


def _wait_gone(env: dict[str, str], ids: list[str], timeout_s: float) -> None:
    """Until none of the jobs (arrays included) is pending or running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cp = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], env=env, capture_output=True,
                            text=True, timeout=30)
        if cp.returncode == 0 and not cp.stdout.strip():
            return
        time.sleep(0.25)
    subprocess.run(["scancel", *ids], env=env, timeout=30)
    raise TimeoutError(f"jobs {ids} still running after {timeout_s:g} s (cancelled)")


def _run_span(journal: Path) -> tuple[float, float, int]:
    """(first start, last end, tasks ok) of an ``ipmtc run`` from its journal."""
    from ipmtc.journal import Journal

    jr = Journal.open(journal, readonly=True)
    try:
        rows = list(jr.rows())
    finally:
        jr.close()
    return (min(r["started"] for r in rows), max(r["finished"] for r in rows),
            sum(r["outcome"] == "ok" for r in rows))


def _ends(work: Path) -> list[float]:
    return [float(p.read_text()) for p in work.glob("end-*")]


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--singles", type=int, default=200)
    ap.add_argument("--single-s", type=float, default=1.0)
    ap.add_argument("--mpi", type=int, default=20)
    ap.add_argument("--mpi-s", type=float, default=5.0)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--slurm-conf", help="use this running Slurm (the tests' session cluster) instead of starting one")
    args = ap.parse_args(argv)
    if args.smoke:
        args.singles, args.single_s, args.mpi, args.mpi_s = 24, 0.2, 4, 1.0
    if os.geteuid() != 0 and not args.slurm_conf:
        raise SystemExit("benchmarks/packing.py starts a local Slurm and needs root (or give --slurm-conf)")
    m = machine()
    work = Path(tempfile.mkdtemp(prefix="ipmtc-packing-"))
    ipd = work / "ipython"
    ipd.mkdir()
    base = work / "slurm"
    harness_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "IPMTC_"))}
    harness_env.update(IPMTC_SLURM_BASE=str(base), IPMTC_SLURM_NODES=str(NODES), IPMTC_SLURM_CPUS=str(CPUS),
                       IPMTC_SLURM_MIN_JOB_AGE="60")
    conf = args.slurm_conf
    try:
        if conf is None:
            cp = subprocess.run(["bash", str(HARNESS / "start-slurm.sh")], env=harness_env, capture_output=True,
                                text=True, timeout=600)
            if cp.returncode != 0:
                raise SystemExit(f"could not start the local Slurm: {cp.stderr[-1500:]}")
            conf = re.search(r"SLURM_CONF=(\S+)", cp.stdout).group(1)  # type: ignore[union-attr]
        env = _env(conf, ipd)
        prog = work / "mpisleep"
        (work / "mpisleep.c").write_text(MPI_C)
        subprocess.run([venv_bin("mpicc"), "-O1", "-o", str(prog), str(work / "mpisleep.c")], check=True,
                       timeout=120, cwd=work)
        singles = [f"sleep {args.single_s:g}" for _ in range(args.singles)]
        wide = [f"[ranks={args.ranks}] {prog} {args.mpi_s:g}" for _ in range(args.mpi)]
        cores = NODES * CPUS
        core_s = args.singles * args.single_s + args.mpi * args.ranks * args.mpi_s
        bound = max(core_s / cores, args.mpi_s, args.single_s)

        # packed: one job, one file (singles first in the file: ipmtc offers the wide lines first anyway)
        mixed = work / "mixed.txt"
        mixed.write_text("\n".join(singles + wide) + "\n")
        script = work / "packed.sh"
        script.write_text("#!/bin/bash\nset -e\nexport IPMTC_PROFILE=ipmtc-$SLURM_JOB_ID\n"
                          "trap 'ipmtc stop >/dev/null 2>&1 || true; date +%s.%N > end-packed' EXIT\n"
                          f"ipmtc start\nipmtc run {mixed} --no-progress\n")
        t0 = time.time()
        jid = _sbatch(env, ["-N", str(NODES), f"--ntasks-per-node={CPUS}", "-o", str(work / "packed.out"),
                            str(script)], work)
        _wait_gone(env, [jid], 1800)
        packed_job = max(_ends(work)) - t0
        first, last, ok = _run_span(Path(f"{mixed}.journal.db"))
        packed_run = last - first
        assert ok == args.singles + args.mpi, (work / "packed.out").read_text()[-2000:]
        for p in work.glob("end-*"):
            p.unlink()

        # split: a job array of MPI jobs beside a plain ipmtc run on half the nodes, submitted together
        plain = work / "singles.txt"
        plain.write_text("\n".join(singles) + "\n")
        script = work / "split.sh"
        script.write_text("#!/bin/bash\nset -e\nexport IPMTC_PROFILE=ipmtc-$SLURM_JOB_ID\n"
                          "trap 'ipmtc stop >/dev/null 2>&1 || true; date +%s.%N > end-singles' EXIT\n"
                          f"ipmtc start\nipmtc run {plain} --no-progress\n")
        arr = work / "array.sh"
        arr.write_text("#!/bin/bash\nset -e\n"
                       f"srun --mpi=pmi2 {prog} {args.mpi_s:g}\n"
                       "date +%s.%N > end-array-$SLURM_ARRAY_TASK_ID\n")
        per_node = CPUS
        t0 = time.time()
        ids = [_sbatch(env, ["-N", str(NODES // 2), f"--ntasks-per-node={CPUS}", "-o", str(work / "split.out"),
                             str(script)], work),
               _sbatch(env, [f"--array=0-{args.mpi - 1}", "-N", str(-(-args.ranks // per_node)),
                             f"-n{args.ranks}", "-o", str(work / "array-%a.out"), str(arr)], work)]
        _wait_gone(env, ids, 3600)
        split = max(_ends(work)) - t0
        assert len(_ends(work)) == args.mpi + 1, sorted(p.name for p in work.glob("*.out"))
    finally:
        if args.slurm_conf is None:
            subprocess.run(["bash", str(HARNESS / "stop-slurm.sh"), "--purge"], env=harness_env,
                           capture_output=True, timeout=300)

    rows = [
        ["packed: `ipmtc run` (first start to last end)", packed_run, bound / packed_run],
        ["packed: whole job (submit to end, start-up and stop included)", packed_job, bound / packed_job],
        ["split: job array of MPI jobs + `ipmtc run` on 2 nodes (submit to last end)", split, bound / split],
    ]
    md = (f"### Packing: {args.singles} x {args.single_s:g} s single-core + {args.mpi} x {args.mpi_s:g} s "
          f"{args.ranks}-rank MPI tasks, local Slurm {NODES} nodes x {CPUS} cores\n\n"
          f"{machine_line(m)}; lower bound max(core-seconds / cores, longest task) = {bound:.1f} s; the fake "
          "nodes share this machine's real cores (the tasks sleep)\n\n"
          + md_table(["run", "makespan (s)", "bound / makespan (target >= 0.90)"], rows)
          + f"\n\nPacked over split: {split / packed_run:.2f}x faster (run), {split / packed_job:.2f}x (whole job).\n")
    shutil.rmtree(work, ignore_errors=True)  # (kept when the run failed: its job outputs say why)
    write_outputs(args.out, "packing", md, {"machine": m, "bound_s": bound, "packed_run_s": packed_run,
                                            "packed_job_s": packed_job, "split_s": split, "args": vars(args) | {
                                                "out": str(args.out)}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
