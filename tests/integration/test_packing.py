"""``ipmtc run`` with lines wider than one core, on a real local cluster with real mpiexec (the mpich wheel).

This machine's engines are pinned one per CPU; a ``[cores=2]`` line must get both CPUs, an MPI line its
ranks pinned one per slot, and no two lines may ever hold the same engine slot at the same time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ipmtc import cluster
from ipmtc.commands import run_commands
from ipmtc.errors import TaskFileError
from ipmtc.packing import parse_line
from ipmtc.slots import Need

from .._spans import overlapping
from ..conftest import stop_and_check, wait_all_dead

IPMTC = [sys.executable, "-m", "ipmtc"]
PY = sys.executable
CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs for 2-wide lines")

# each rank writes its own file (ranks printing to one stdout interleave)
MPI_HELLO = (f"{PY} -c \"from mpi4py import MPI; import os; c = MPI.COMM_WORLD; "
             "open('{d}/rank%d' % c.rank, 'w').write("
             "'%d %d %s' % (c.rank, c.size, os.environ.get('IPMTC_RANK_CPU')))\"")


@pytest.fixture
def two_core_cluster():
    info = cluster.start(profile="packing", flags={"launcher": "local"}, engines=len(CPUS))
    try:
        yield info
    finally:
        stop_and_check(info)


def _overlaps(records) -> list:
    """Pairs of attempts that held one engine slot at the same time."""
    return overlapping((e, r.started, r.finished, r.index) for r in records
                       if r.started is not None and r.finished is not None for e in (r.slots or (r.engine_id,)))


def test_mixed_file_cores_mpi_failure_walltime(two_core_cluster, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    once = tmp_path / "failed-once"
    lines = [
        "echo single-1",
        f"[cores=2] {PY} -c \"import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])\"",
        f"[ranks=2] {MPI_HELLO.format(d=tmp_path)}",
        "echo single-2",
        # an MPI line that fails the first time (one rank exits 1), then succeeds: retried
        f"[ranks=2] {PY} -c \"import os, sys; from mpi4py import MPI; r = MPI.COMM_WORLD.rank; "
        f"first = not os.path.exists('{once}'); MPI.COMM_WORLD.Barrier(); "
        f"(r == 0 and first and (open('{once}', 'w').close() or sys.exit(1)))\"",
        # an MPI line past its walltime: every rank killed
        f"[ranks=2 walltime=10] {PY} -c \"import os, time; open('{pids}/' + str(os.getpid()), 'w').close(); "
        "time.sleep(600)\"",
    ]
    res = run_commands(lines, client=None, outdir=tmp_path / "out", retries=1, progress=False)
    by_line = {r.index + 1: r for r in res.records}
    assert [r.outcome for r in res.records] == ["ok", "ok", "ok", "ok", "ok", "walltime"], res.failed
    assert by_line[5].attempts == 2  # failed once, retried
    out = (tmp_path / "out" / "2.out").read_text()
    cpus, threads = out.rsplit("]", 1)
    cpus = [int(c) for c in cpus.strip("[ ").split(",")]
    assert len(set(cpus)) == 2 and set(cpus) <= set(CPUS) and threads.strip() == "2"  # two cores, two threads
    assert cpus == res[1]["cpus"]  # the cores of the two engines it held
    ranks = sorted(p.read_text() for p in tmp_path.glob("rank*"))
    assert [r.split()[:2] for r in ranks] == [["0", "2"], ["1", "2"]]
    rank_cpus = sorted(int(r.split()[2]) for r in ranks)
    assert len(set(rank_cpus)) == 2 and set(rank_cpus) <= set(CPUS)  # one rank per slot's CPU
    assert by_line[2].slots and len(by_line[2].slots) == 2 and len(by_line[3].slots) == 2
    assert not _overlaps(res.records)
    rank_pids = [int(p.name) for p in pids.iterdir()]
    assert 1 <= len(rank_pids) <= 4 and by_line[6].attempts == 2  # a walltime spends a retry too (2 x 2 ranks)
    assert not wait_all_dead(rank_pids, timeout_s=10), "a rank of the timed-out line survived"


def test_wide_line_that_no_node_holds_is_refused_before_anything_runs(two_core_cluster, tmp_path):
    marker = tmp_path / "ran"
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"touch {marker}\n[cores={len(CPUS) + 2}] echo too wide\n")
    cp = subprocess.run([*IPMTC, "run", str(tasks), "--profile", "packing", "--no-progress"], capture_output=True,
                        text=True, timeout=120)
    assert cp.returncode == 1 and cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr
    assert f"line 2: needs {len(CPUS) + 2} cores on one node" in cp.stderr, cp.stderr
    assert not marker.exists()


@pytest.mark.parametrize("text, message", [
    ("[cores=0] x", "line 3: cores=0 must be a whole number >= 1"),
    ("[gpus=1] x", "line 3: 'gpus=1' in [gpus=1] is not KEY=N"),
    ("[cores=2 ranks=2] x", "line 3: give cores= (one node) or ranks= (MPI), not both"),
    ("[nodes=2] x", "line 3: nodes= goes with ranks="),
    ("[ranks=2 nodes=3] x", "line 3: 3 nodes for 2 ranks"),
    ("[cores=2]", "line 3: [cores=2] is followed by no command"),
    ("[walltime=soon] x", "line 3: walltime=soon must be a whole number >= 1"),
])
def test_malformed_resource_lines(text, message, tmp_path, ipython_dir):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"echo a\n# comment\n{text}\n")
    cp = subprocess.run([*IPMTC, "run", str(tasks)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1 and cp.stderr.count("\n") == 1 and message in cp.stderr, cp.stderr
    with pytest.raises(TaskFileError):
        parse_line(3, text)


def test_shell_test_bracket_is_not_a_prefix():
    assert parse_line(1, "[ -f x ] && echo y").need == Need()
    assert parse_line(1, "[ranks=4, nodes=2] ./a").need == Need(ranks=4, nodes=2)
    json.dumps(parse_line(1, "[cores=3] b").need.__dict__)


def test_engines_removed_mid_run_give_up_their_slots_without_loss(two_core_cluster, tmp_path):
    """`ipmtc remove` during a packed run: the removed engine's slot is granted no more, the line it holds
    runs to its end (or again elsewhere, uncharged, should its answer go with the engine), the others carry
    on on the engine left: every line ok, none failed, retried or charged a crash."""
    import threading
    import time

    from ipmtc import elastic

    from .._wait import wait_for

    hold, marks = tmp_path / "hold", tmp_path / "marks"
    hold.touch()
    marks.mkdir()
    # waits while the hold file exists, polled, with a deadline (2400 x 0.05 s) far beyond the test's own waits
    gated = f"touch {marks}/$$; for _ in $(seq 1 2400); do [ -e {hold} ] || break; sleep 0.05; done; echo done"
    lines = [f"[cores=2] {PY} -c \"print('wide')\""] + [gated] * 6
    got: dict = {}
    runner = threading.Thread(target=lambda: got.update(res=run_commands(
        lines, client=None, outdir=tmp_path / "out", progress=False)))
    runner.start()
    try:
        wait_for(lambda: len(list(marks.iterdir())) == 2, 60, "two gated lines running, one per engine")
        left = elastic.remove(two_core_cluster.profile, engines=1, wait=False)
        removed_at = time.time()
        assert len(left) == 1
    finally:
        hold.unlink()
        runner.join(180)
    res = got["res"]
    assert [r.outcome for r in res.records] == ["ok"] * 7, res.failed
    assert all(r.attempts == 1 and not r.crashes for r in res.records)
    late = [r for r in res.records if r.started and r.started > removed_at]
    assert len(late) >= 4 and all(r.engine_id != left[0] for r in late), [(r.index, r.engine_id) for r in late]
