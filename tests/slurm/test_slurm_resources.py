"""Cores, GPUs, pools and wide command lines inside real Slurm jobs (4 fake nodes n1..n4, 4 CPUs each).

The fake nodes share this host's few real CPUs (Slurm is told each has 4): ipmtc numbers each node's
cores 0..3 and pins them onto the real CPUs round-robin. What must hold is the bookkeeping: on each node
the engines' cores are disjoint and K wide, and no two command lines ever hold the same engine slot.
GPUs are Slurm's own (gres with fake device files, ``IPMTC_SLURM_GPUS`` in the harness): measured here,
Slurm 22.05 sets ``CUDA_VISIBLE_DEVICES`` (and ``SLURM_JOB_GPUS``, ``SLURM_GPUS_ON_NODE``) to the job's
GPUs, and on nodes with gres it *removes* a ``CUDA_VISIBLE_DEVICES`` the job exported from every step that
asked for no GPU -- so an inherited list is tested on one node, outside Slurm
(``tests/integration/test_resources.py``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from .._spans import overlapping
from ..conftest import wait_all_dead

pytestmark = pytest.mark.slurm
PY = sys.executable

ENGINES_JSON = """
import json, sys, ipmtc
from ipmtc.resources import engine_resources
rc = ipmtc.connect()
info = dict(zip(rc.ids, rc[:].apply_sync(engine_resources)))
nodes = dict(zip(rc.ids, rc[:].apply_sync(lambda: __import__('os').environ.get('SLURMD_NODENAME'))))
out = {"engines": {str(i): dict(info[i], node=nodes[i]) for i in rc.ids}}
if len(sys.argv) > 2:
    res = ipmtc.dynamic_map(lambda x: __import__('os').getpid(), range(64), pool=sys.argv[2], progress=False)
    pids = dict(zip(rc.ids, rc[:].apply_sync(__import__('os').getpid)))
    out["pool_engines"] = sorted(i for i, p in pids.items() if p in set(res))
json.dump(out, open(sys.argv[1], "w"))
"""


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/bash\nset -euo pipefail\nexport IPMTC_PROFILE=ipmtc-$SLURM_JOB_ID\n"
                    "trap 'ipmtc stop >/dev/null 2>&1 || true' EXIT\n" + body)
    path.chmod(0o755)
    return path


def _engines(tmp_path: Path, jobs, start_args: str, env_extra: dict[str, str] | None = None, pool: str = "",
             sbatch: tuple[str, ...] = ()):
    probe = tmp_path / "engines.py"
    probe.write_text(ENGINES_JSON)
    out = tmp_path / "engines.json"
    exports = "".join(f"export {k}={v}\n" for k, v in (env_extra or {}).items())
    script = _script(tmp_path, "engines.sh", f"{exports}ipmtc start {start_args}\nipmtc status\n"
                                             f"{PY} {probe} {out} {pool}\n")
    env = jobs.slurm.env()
    job = jobs.run(["-N", "4", "--ntasks-per-node=4", *sbatch], script, env=env, name="engines", timeout_s=180)
    assert job.state == "COMPLETED" and job.exit_code == 0, (job.state, job.output)
    return json.loads(out.read_text()), job.output


def _cores_by_node(engines: dict) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for e in engines.values():
        out.setdefault(e["node"], []).append([int(c) for c in e["cores"].split(",")])
    return out


def test_cores_per_engine_disjoint_and_k_wide_with_threads(jobs, tmp_path):
    data, output = _engines(tmp_path, jobs, "--cores-per-engine 2")
    engines = data["engines"]
    assert len(engines) == 8, output  # 4 nodes x 4 cores / 2
    for node, cores in _cores_by_node(engines).items():
        assert sorted(cores) == [[0, 1], [2, 3]], (node, cores)
    assert all(e["threads"] == "2" for e in engines.values())
    assert "cores" in output and "cpus" in output  # ipmtc status lists each engine's cores


def test_slurm_gres_gpus_each_engine_its_own(jobs, tmp_path):
    """GPUs Slurm itself hands out (gres with fake device files): every engine sees one, disjoint per node."""
    data, output = _engines(tmp_path, jobs, "--gpus-per-engine 2", sbatch=("--gres=gpu:4",))
    by_node: dict[str, list[str]] = {}
    for e in data["engines"].values():
        by_node.setdefault(e["node"], []).append(e["gpus"])
    assert set(by_node) == {"n1", "n2", "n3", "n4"}
    assert all(sorted(g) == ["0,1", "2,3"] for g in by_node.values()), by_node
    for e in data["engines"].values():  # 2 GPU engines on 4 cores: an even share, 2 each
        assert len(e["cores"].split(",")) == 2 and e["threads"] == "2"


def test_pools_two_srun_steps_and_a_map_that_stays_in_its_pool(jobs, tmp_path):
    data, output = _engines(tmp_path, jobs, "--pool gpu:gpus-per-engine=1 --pool cpu:cores-per-engine=1",
                            pool="gpu", sbatch=("--gres=gpu:2",))
    engines = data["engines"]
    gpu = sorted(int(i) for i, e in engines.items() if e["pool"] == "gpu")
    cpu = [i for i, e in engines.items() if e["pool"] == "cpu"]
    assert len(gpu) == 8 and len(cpu) == 8, engines
    for node, cores in _cores_by_node(engines).items():
        assert sorted(c for cs in cores for c in cs) == [0, 1, 2, 3], (node, cores)  # gpu 0-1, cpu 2-3
    assert all(e["gpus"] == "" for e in engines.values() if e["pool"] == "cpu")
    assert data["pool_engines"] and set(data["pool_engines"]) <= set(gpu)
    assert "pool gpu: 8 engines" in output and "pool cpu: 8 engines" in output


def _held(rows):
    """Pairs of lines that held one engine slot at the same time (from the journal's recorded placements)."""
    spans = []
    for r in rows:
        value = r.get("value")
        engines = value.get("engines") if isinstance(value, dict) and "engines" in value else [r["engine_id"]]
        if r["started"] is not None and r["finished"] is not None:
            spans += [(e, r["started"], r["finished"], r["idx"]) for e in engines]
    return overlapping(spans)


def test_mixed_command_file_cores_and_mpi_lines(jobs, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    once = tmp_path / "failed-once"
    mpi = (f"{PY} -c \"from mpi4py import MPI; import os; c = MPI.COMM_WORLD; "
           f"open('{tmp_path}/r%s-%d' % (os.environ['IPMTC_TASK_LINE'], c.rank), 'w').write("
           "'%d %s %s' % (c.size, os.environ.get('SLURMD_NODENAME'), MPI.Get_processor_name()))\"")
    lines = [f"sleep 0.5; echo single {i}" for i in range(12)]
    lines += [f"[cores=4] {PY} -c \"import os; print(os.environ['OMP_NUM_THREADS'])\"" for _ in range(3)]
    lines += [f"[ranks=8] {mpi}" for _ in range(3)]
    lines += [f"[ranks=8 nodes=2] {mpi}"]
    lines += [f"[ranks=8] {PY} -c \"import os, sys; from mpi4py import MPI; r = MPI.COMM_WORLD.rank; "
              f"first = not os.path.exists('{once}'); MPI.COMM_WORLD.Barrier(); "
              f"(r == 0 and first and (open('{once}', 'w').close() or sys.exit(1)))\""]
    lines += [f"[ranks=8 walltime=20] {PY} -c \"import os, time; open('{pids}/' + str(os.getpid()), 'w').close(); "
              "time.sleep(600)\""]
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    script = _script(tmp_path, "mixed.sh", f"ipmtc start\nipmtc run {tasks} --retries 1 --no-progress || true\n")
    job = jobs.run(["-N", "4", "--ntasks-per-node=4"], script, name="mixed", timeout_s=300)
    assert job.state == "COMPLETED", (job.state, job.output)
    from ipmtc.journal import Journal

    jr = Journal.open(f"{tasks}.journal.db", readonly=True)
    try:
        rows = list(jr.rows(values=True))
    finally:
        jr.close()
    by_line = {r["idx"] + 1: r for r in rows}
    n = len(lines)
    assert [by_line[i]["outcome"] for i in range(1, n + 1)] == ["ok"] * (n - 1) + ["walltime"], job.output
    assert by_line[n - 1]["attempts"] == 2  # the MPI line that failed once was retried
    assert not _held(rows), "two lines held one engine slot at once"
    for i in range(13, 16):  # 4-core lines: one node, 4 threads
        value = by_line[i]["value"]
        assert len(value["engines"]) == 4 and len(value["nodes"]) == 1
        assert (tmp_path / "tasks.txt.out" / f"{i}.out").read_text().split()[0] == "4"
    runs = {}
    for f in tmp_path.glob("r*-*"):
        size, node, _ = f.read_text().split()
        runs.setdefault(int(f.name[1:].split("-")[0]), []).append((int(size), node))
    assert sorted(runs) == [16, 17, 18, 19] and all(len(r) == 8 for r in runs.values()), runs
    assert all(size == 8 for r in runs.values() for size, _ in r)
    for i in range(16, 20):  # ranks on exactly the nodes the driver granted
        value = by_line[i]["value"]
        assert sum(len(s) for _, s in value["nodes"]) == 8
    assert len(by_line[19]["value"]["nodes"]) == 2  # nodes=2: 4 + 4
    rank_pids = [int(p.name) for p in pids.iterdir()]
    assert rank_pids and not wait_all_dead(rank_pids, timeout_s=15), "a rank of the timed-out line survived"
    assert os.path.exists(f"{tasks}.journal.db")
