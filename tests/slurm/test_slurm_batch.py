"""ipmtc inside real Slurm jobs on the project's local 4-node cluster (n1..n4).

Each test submits a batch job (the scripts in batch/ where possible) with the
test's private IPYTHONDIR and asserts on the files the job wrote. The autouse
``ipython_dir`` fixture then checks that no process of the test (everything a
job starts inherits that IPYTHONDIR) is left running.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from ipmtc import _proc
from ipmtc.journal import Journal

from .._wait import wait_for
from ._helpers import BATCH, check_results, engines_per_node, journal_rows, ready_epoch
from .conftest import record

pytestmark = pytest.mark.slurm

FOUR_NODES = {"n1", "n2", "n3", "n4"}


def _state_file(ipython_dir: Path, job_id: str) -> Path:
    return ipython_dir / f"profile_ipmtc-{job_id}" / "security" / "ipmtc-cluster.json"


def _listening(pids: list[int]) -> list[tuple[str, int, str]]:
    """(address, port, process) of every TCP socket the processes listen on."""
    import psutil

    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out += [(c.laddr.ip, c.laddr.port, " ".join(proc.cmdline())[:80])
                    for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return out


def _assert_stopped(output: str) -> None:
    assert re.search(r"^ipmtc: stopped cluster ipmtc-\d+ \(\d+ processes\)", output, re.M), output


# ---------------------------------------------------------------- slurm.sbatch, srun


def test_slurm_sbatch_runs_on_all_four_nodes(jobs, tmp_path):
    """`sbatch --wait -N 4 --ntasks-per-node=4 batch/slurm.sbatch`: 4 engines on each node (srun), map results."""
    res_file = tmp_path / "results.json"
    n, samples = 200, 2000
    job, rc = jobs.sbatch_wait(["-N", "4", "--ntasks-per-node=4"], BATCH / "slurm.sbatch",
                               ["--tasks", str(n), "--samples", str(samples), "--out", str(res_file)],
                               name="slurm-sbatch")
    out = job.output
    assert rc == 0 and job.state == "COMPLETED", f"sbatch --wait exited {rc} ({job.state}):\n{out}"
    assert "engines: 16/16 registered" in out and "launcher srun" in out, out
    assert engines_per_node(out) == {"n1": 4, "n2": 4, "n3": 4, "n4": 4}, out
    data = check_results(res_file, n, samples)
    assert data["summary"]["ok"] == n and not data["undone"]
    assert set(data["per_node"]) == FOUR_NODES, data["per_node"]
    assert re.search(r"^tasks per node: n1=\d+ n2=\d+ n3=\d+ n4=\d+$", out, re.M), out
    assert re.search(r"^pi ~ 3\.1\d+", out, re.M), out
    assert data["job_end_time"] is not None  # squeue answered inside the job
    _assert_stopped(out)
    took = ready_epoch(out) - job.submitted
    m = re.search(r"16 engines registered in ([\d.]+) s", out)
    record("sbatch -> 16 engines registered (4 nodes x 4, srun)",
           f"{took:.1f} s (ipmtc start itself: {m.group(1) if m else '?'} s)")


# ---------------------------------------------------------------- mpiexec + the SIGTERM trap


def test_mpiexec_engines_register_and_sigterm_trap_stops_cleanly(jobs, slurm, tmp_path, ipython_dir):
    """`--launcher mpiexec` (hydra through srun) registers 16 engines; the walltime SIGTERM runs the trap.

    `scancel --batch --signal=TERM` delivers what `#SBATCH --signal=B:TERM@120` delivers before the
    walltime: the script is interrupted (finished tasks stay in the journal), the cluster stopped.
    """
    journal = tmp_path / "pi.db"
    env = slurm.env(IPMTC_LAUNCHER="mpiexec")
    job = jobs.submit(["-N", "4", "--ntasks-per-node=4"], BATCH / "slurm.sbatch",
                      ["--tasks", "5000", "--samples", "100", "--task-seconds", "0.3", "--journal", str(journal)],
                      env=env, name="mpiexec-term")
    jobs.wait_for_output(job, r"^16 engines, 5000 tasks", timeout_s=150)
    out = job.output
    took = ready_epoch(out) - job.submitted
    assert "launcher mpiexec" in out and "engines: 16/16 registered" in out, out
    assert engines_per_node(out) == {"n1": 4, "n2": 4, "n3": 4, "n4": 4}, out
    m = re.search(r"16 engines registered in ([\d.]+) s", out)
    record("sbatch -> 16 engines registered (4 nodes x 4, mpiexec)",
           f"{took:.1f} s (ipmtc start itself: {m.group(1) if m else '?'} s)")
    state = json.loads(_state_file(ipython_dir, job.job_id).read_text())
    assert {e["node"] for e in state["engines"].values()} == FOUR_NODES
    # one hydra rank per node forks that node's 4 engines (one import of ipyparallel per node)
    assert sorted(int(e["rank"]) for e in state["engines"].values()) == sorted(list(range(4)) * 4)

    # some tasks finish and are journaled (5000 tasks of 0.3 s on 16 engines: over 90 s of work left)
    wait_for(lambda: any(r["outcome"] == "ok" for r in journal_rows(journal)), 120, "a task recorded in the journal",
             interval_s=0.2)
    t0 = time.monotonic()
    slurm.cmd("scancel", "--batch", "--signal=TERM", job.job_id)
    jobs.wait(job, timeout_s=60)
    stop_s = time.monotonic() - t0
    out = job.output
    assert "received SIGTERM" in out, out
    assert "interrupting batch/example_mtc.py" in out and "interrupted:" in out, out
    _assert_stopped(out)
    assert job.state != "CANCELLED" and job.exit_code == 143, (job.state, job.exit_code, out)
    assert stop_s < 30, f"SIGTERM to job end took {stop_s:.1f} s"
    jr = Journal.open(journal, readonly=True)
    try:
        counts = jr.counts()
    finally:
        jr.close()
    assert counts.get("ok", 0) > 0, counts  # what finished before the signal is kept
    record("SIGTERM trap: signal -> job ended (cluster stopped)", f"{stop_s:.1f} s, {counts.get('ok')} tasks kept")


# ---------------------------------------------------------------- losing a node


def test_losing_one_nodes_engines_mid_map(jobs, tmp_path, ipython_dir):
    """SIGKILL of n3's engines and nannies mid-map: the map completes on n1, n2, n4, every result right."""
    res_file, journal = tmp_path / "results.json", tmp_path / "pi.db"
    n, samples = 240, 500
    job = jobs.submit(["-N", "4", "--ntasks-per-node=2"], BATCH / "slurm.sbatch",
                      ["--tasks", str(n), "--samples", str(samples), "--task-seconds", "0.25",
                       "--journal", str(journal), "--out", str(res_file)], name="lose-node")
    jobs.wait_for_output(job, r"^8 engines, 240 tasks", timeout_s=150)
    state = json.loads(_state_file(ipython_dir, job.job_id).read_text())
    victims = {int(eid): e["pid"] for eid, e in state["engines"].items() if e["node"] == "n3"}
    assert len(victims) == 2, state["engines"]
    # secure by default across nodes: nothing of the cluster listens on all interfaces, and it runs curve
    # (srun itself, Slurm's process, listens on all interfaces for its tasks' I/O: slurmstepd connects
    # back with the job's credential; srun has no option to bind one address)
    listening = [a for a in _listening(state["pids"]) if not a[2].startswith(("srun", "/usr/bin/srun"))]
    assert listening and not [a for a in listening if a[0] in ("0.0.0.0", "::")], [a for a in listening
                                                                                  if a[0] in ("0.0.0.0", "::")]
    conn = json.loads((_state_file(ipython_dir, job.job_id).parent / "ipcontroller-client.json").read_text())
    assert conn.get("curve_serverkey"), "a 4-node cluster should run CurveZMQ (security: auto)"
    # the map is under way and the victims are in it: a task of each is recorded (the map keeps every
    # engine busy until its last few tasks: 240 tasks of 0.25 s on 8 engines take 7.5 s at least)
    seen: list[dict] = []

    def victims_at_work() -> bool:
        seen[:] = journal_rows(journal)
        return set(victims) <= {r["engine_id"] for r in seen}

    wait_for(victims_at_work, 120, lambda: f"a task of each of n3's engines {sorted(victims)} recorded "
             f"(recorded: {len(seen)} tasks, by engines {sorted({r['engine_id'] for r in seen})})", interval_s=0.1)
    killed = []
    for pid in victims.values():
        for p in _proc.process_tree(pid):  # the engine and its nanny
            try:
                os.kill(p, signal.SIGKILL)
                killed.append(p)
            except ProcessLookupError:
                pass
    t_kill = time.time()
    assert len(killed) >= 4, killed  # 2 engines + 2 nannies
    at_kill = len(journal_rows(journal))
    jobs.wait(job, timeout_s=120)
    out = job.output
    assert job.state == "COMPLETED" and job.exit_code == 0, (job.state, out)
    data = check_results(res_file, n, samples)
    assert data["summary"]["ok"] == n and not data["undone"] and not data["failed"], data["summary"]
    assert data["summary"]["engine_losses"] == 2, (data["summary"], f"{at_kill} of {n} tasks recorded at the kill")
    assert {"n1", "n2", "n4"} <= set(data["per_node"]), data["per_node"]
    assert not any(_proc.alive(p) for p in killed)
    _assert_stopped(out)
    finished = json.loads(res_file.read_text())["summary"]["makespan_s"]
    record("node loss (2 of 8 engines on n3 killed)", f"map finished, engine loss noticed; job ended "
           f"{os.path.getmtime(job.out) - t_kill:.1f} s after the kill (map makespan {finished:.1f} s)")


# ---------------------------------------------------------------- walltime draining


def test_walltime_shorter_than_the_work_drains(jobs, tmp_path):
    """`sbatch -t 2` with 2000 one-second tasks on 4 engines (~500 s of work): drains, lists the undone tasks.

    The map reads the end time from squeue; with --drain-margin-s 85 it stops handing out tasks
    ~34 s into the job, the running ones finish, the cluster is stopped: exit status 3 (documented:
    drained), not a job killed by Slurm (TIMEOUT) and no SIGTERM needed.
    """
    res_file = tmp_path / "results.json"
    journal = tmp_path / "pi.db"
    n, samples = 2000, 100
    job = jobs.submit(["-N", "4", "--ntasks-per-node=1", "-t", "2", "--signal=B:TERM@10"],
                      BATCH / "slurm.sbatch",
                      ["--tasks", str(n), "--samples", str(samples), "--task-seconds", "1",
                       "--drain-margin-s", "85", "--journal", str(journal), "--out", str(res_file)],
                      name="drain")
    jobs.wait(job, timeout_s=150)
    out = job.output
    assert job.state != "TIMEOUT" and job.exit_code == 3, (job.state, job.exit_code, out)
    assert "received SIGTERM" not in out, out
    start = time.mktime(time.strptime(job.info["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    end = time.mktime(time.strptime(job.info["EndTime"], "%Y-%m-%dT%H:%M:%S"))
    assert end - start < 100, f"the job ran {end - start:.0f} s of its 120 s"
    data = check_results(res_file, n, samples)
    assert data["job_end_time"] is not None and abs(data["job_end_time"] - (start + 120)) <= 2, data["job_end_time"]
    undone = data["undone"]
    assert undone and data["summary"]["ok"] > 0 and data["summary"]["ok"] + len(undone) == n, data["summary"]
    m = re.search(r"^undone tasks \((\d+)\): ([\d ]+)", out, re.M)
    assert m and int(m.group(1)) == len(undone), out
    assert [int(x) for x in m.group(2).split()] == undone[:50]
    assert "submit again with --journal" in out
    _assert_stopped(out)
    record("walltime drain (-t 2, margin 85 s, 4 engines)",
           f"job ran {end - start:.0f} s of 120 s; {data['summary']['ok']} done, {len(undone)} undone, exit 3")


# ---------------------------------------------------------------- too many nodes


def test_more_nodes_than_the_allocation_is_a_clear_error(jobs, tmp_path, ipython_dir):
    """`ipmtc start --nodes 5` in a 4-node job: one line on stderr, exit 1, nothing started or left."""
    err = tmp_path / "start.err"
    job = jobs.run(["-N", "4", "--ntasks-per-node=1", "--wrap",
                    f"ipmtc start --nodes 5 2>{err}; echo start-rc=$?; ls $IPYTHONDIR; "
                    "squeue -h -s -j $SLURM_JOB_ID -o 'step %i'"], name="nodes5", timeout_s=60)
    out = job.output
    assert job.state == "COMPLETED", out
    assert "start-rc=1" in out, out
    lines = err.read_text().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(r"ipmtc: error: --nodes 5 but this slurm allocation \d+ has 4 nodes \(n\[1-4\]\); "
                        r"ask for at most 4", lines[0]), lines[0]
    assert not re.search(r"^step \d+\.\d+$", out, re.M), out  # no engine step was started
    assert not list(ipython_dir.glob("profile_*/security/ipmtc-cluster.json"))


# ---------------------------------------------------------------- command lists


def test_slurm_commands_sbatch_runs_a_task_file(jobs, tmp_path):
    """`batch/slurm-commands.sbatch tasks.txt`: every line runs once, spread over the four nodes."""
    tasks = tmp_path / "tasks.txt"
    lines = ["# one command per line; blank lines and comments are skipped", ""]
    lines += [f'sleep 0.2; echo "task {i} on $SLURMD_NODENAME line $IPMTC_TASK_LINE"' for i in range(24)]
    tasks.write_text("\n".join(lines) + "\n")
    job = jobs.run(["-N", "4", "--ntasks-per-node=1"], BATCH / "slurm-commands.sbatch", [str(tasks)],
                   name="commands", timeout_s=120)
    out = job.output
    assert job.state == "COMPLETED" and job.exit_code == 0, (job.state, out)
    outdir = Path(f"{tasks}.out")
    nodes = set()
    for i in range(24):
        line = i + 3
        text = (outdir / f"{line}.out").read_text()
        m = re.fullmatch(rf"task {i} on (n[1-4]) line {line}\n", text)
        assert m, text
        nodes.add(m.group(1))
    assert nodes == FOUR_NODES, nodes
    assert Path(f"{tasks}.journal.db").exists()
    _assert_stopped(out)
