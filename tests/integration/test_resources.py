"""Engines bound to cores and GPUs, and engine pools, on a real local cluster (this machine's real CPUs).

GPUs here are an inherited ``CUDA_VISIBLE_DEVICES`` list (what a batch system that already limited the
node's devices leaves): ipmtc must give each engine its own subset of those ids and nothing else.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import ipmtc
from ipmtc import cluster
from ipmtc.errors import MapError

from ..conftest import stop_and_check

IPMTC = [sys.executable, "-m", "ipmtc"]
CPUS = sorted(os.sched_getaffinity(0))


def _seen() -> dict:
    """Run on an engine (and in what it starts): its CPUs, GPUs and thread variables."""
    import os

    return {"pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "omp": os.environ.get("OMP_NUM_THREADS"),
            "mkl": os.environ.get("MKL_NUM_THREADS"), "blas": os.environ.get("OPENBLAS_NUM_THREADS"),
            "pool": os.environ.get("IPMTC_POOL")}


@pytest.fixture
def started():
    infos: list[cluster.ClusterInfo] = []

    def _start(profile: str, **flags):
        info = cluster.start(profile=profile, flags={"launcher": "local", **flags})
        infos.append(info)
        return info

    yield _start
    for info in infos:
        stop_and_check(info)


def _everywhere(info):
    rc = ipmtc.connect(info.profile)
    try:
        rc.wait_for_engines(info.n_engines, timeout=30)
        return dict(zip(rc.ids, rc[:].apply_sync(_seen)))
    finally:
        rc.close()


def test_one_engine_per_core_pinned_disjoint_with_one_thread(started):
    info = started("cores1")
    seen = _everywhere(info)
    assert len(seen) == len(CPUS)
    assert sorted(c for s in seen.values() for c in s["cpus"]) == CPUS  # disjoint, one core each
    assert all(len(s["cpus"]) == 1 for s in seen.values())
    assert all(s["omp"] == s["mkl"] == s["blas"] == "1" for s in seen.values())  # as Dask's nanny does


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")
def test_cores_per_engine_two_threads_fill_exactly_their_share(started):
    info = started("cores2", cores_per_engine=2)
    seen = _everywhere(info)
    assert len(seen) == len(CPUS) // 2
    groups = [set(s["cpus"]) for s in seen.values()]
    assert all(len(g) == 2 for g in groups) and len(set().union(*groups)) == 2 * len(groups)
    assert all(s["omp"] == "2" for s in seen.values())


def test_inherited_cuda_visible_devices_each_engine_sees_only_its_own(started, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    info = started("gpu1", gpus_per_engine=1)
    seen = _everywhere(info)
    assert len(seen) == 4
    assert sorted(s["cuda"] for s in seen.values()) == ["0", "1", "2", "3"]
    # and a command a task starts sees the same
    rc = ipmtc.connect(info.profile)
    try:
        out = rc[:].apply_sync(subprocess.check_output, ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"], text=True)
    finally:
        rc.close()
    assert sorted(o.strip() for o in out) == ["0", "1", "2", "3"]


def test_pools_a_map_with_pool_lands_only_there(started, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    info = started("pools", pools=["gpu:gpus-per-engine=2,engines-per-node=1", "cpu:cores-per-engine=1"])
    seen = _everywhere(info)
    by_pool: dict[str, list[dict]] = {}
    for s in seen.values():
        by_pool.setdefault(s["pool"], []).append(s)
    assert len(by_pool["gpu"]) == 1 and by_pool["gpu"][0]["cuda"] == "4,7"
    assert len(by_pool["cpu"]) == len(CPUS) - 1 and all(s["cuda"] == "" for s in by_pool["cpu"])
    gpu_pids = {s["pid"] for s in by_pool["gpu"]}
    cpu_pids = {s["pid"] for s in by_pool["cpu"]}
    rc = ipmtc.connect(info.profile)
    try:
        res = ipmtc.dynamic_map(_seen_of, range(40), client=rc, pool="gpu", progress=False)
        assert {r["pid"] for r in res} == gpu_pids and {r["cuda"] for r in res} == {"4,7"}
        assert res.summary()["schedule"] == "dynamic, pool gpu"
        res = ipmtc.static_map(_seen_of, range(40), client=rc, pool="cpu", progress=False)
        assert {r["pid"] for r in res} <= cpu_pids
        assert {rec.engine_id for rec in res.records} <= {i for i, s in seen.items() if s["pool"] == "cpu"}
        with pytest.raises(MapError, match="no engine of pool 'nope' in this cluster \\(its pools: cpu, gpu\\)"):
            ipmtc.dynamic_map(_seen_of, range(3), client=rc, pool="nope", progress=False)
    finally:
        rc.close()
    st = subprocess.run([*IPMTC, "status", "--profile", "pools"], capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    assert "pool gpu: 1 engines" in st.stdout and f"pool cpu: {len(CPUS) - 1} engines" in st.stdout
    assert any(line.split()[1:2] == ["gpu"] and "4,7" in line.split() for line in st.stdout.splitlines())


def _seen_of(_i):
    return _seen()


def _held(args):
    """A task that notes its engine's pid in ``marks``, then waits while ``hold`` exists (polled)."""
    import os
    import time

    hold, marks = args
    open(os.path.join(marks, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 120  # (the test's own waits fail long before)
    while os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.05)  # a polling step of the wait on the hold file
    return os.getpid()


def test_a_pool_map_takes_in_engines_of_its_pool_that_join_and_no_others(started, monkeypatch, tmp_path):
    import threading

    from .._wait import wait_for

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    info = started("poolgrow", pools=["gpu:gpus-per-engine=2,engines-per-node=1", "cpu:cores-per-engine=1"])
    hold, marks = tmp_path / "hold", tmp_path / "marks"
    hold.touch()
    marks.mkdir()
    rc = ipmtc.connect(info.profile)
    got: dict[str, object] = {}
    mapper = threading.Thread(target=lambda: got.update(res=ipmtc.dynamic_map(
        _held, [(str(hold), str(marks))] * 8, client=rc, pool="gpu", progress=False)))
    mapper.start()
    try:
        wait_for(lambda: len(list(marks.iterdir())) == 1, 60, "the gpu engine's first task")
        first = {p.name for p in marks.iterdir()}
        for pool in ("gpu:gpus-per-engine=2,engines-per-node=1", "cpu:cores-per-engine=1,engines-per-node=1"):
            cp = subprocess.run([*IPMTC, "add", "--pool", pool, "--profile", "poolgrow"], capture_output=True,
                                text=True, timeout=120)
            assert cp.returncode == 0, cp.stderr
        notes = cluster.engine_notes(cluster.profile_dir("poolgrow"))
        added = {n["pool"]: str(n["pid"]) for n in notes.values() if n.get("origin") != "start"}
        assert set(added) == {"gpu", "cpu"}, notes
        wait_for(lambda: added["gpu"] in {p.name for p in marks.iterdir()}, 60, "the added gpu engine's task")
    finally:
        hold.unlink()
        mapper.join(120)
        rc.close()
    res = got["res"]
    pids = {str(p) for p in res}
    assert pids == first | {added["gpu"]}, (pids, first, added)  # never the added cpu engine
    assert res.ok


@pytest.mark.parametrize("args, env, message", [
    (["--gpus-per-engine", "1"], {}, "1 GPU(s) per engine asked, but this machine"),
    (["--cores-per-engine", str(len(CPUS) + 1)], {}, f"has {len(CPUS)} cores in all; ask for at most {len(CPUS)}"),
    (["--gpus-per-engine", "3"], {"CUDA_VISIBLE_DEVICES": "0,1"}, "3 GPUs per engine, but this machine"),
    (["--pool", "x:color=red"], {}, "'color=red' is not KEY=VALUE"),
    (["--pool", "9x:cores-per-engine=1"], {}, "a pool needs a name"),
    (["--pool", "a:cores-per-engine=1", "--pool", "a:cores-per-engine=2"], {}, "pool 'a' is given twice"),
    (["--pool", "a:cores-per-engine=1", "--cores-per-engine", "2"], {}, "inside each --pool"),
])
def test_impossible_requests_one_line_before_anything_starts(args, env, message, ipython_dir):
    cp = subprocess.run([*IPMTC, "start", "--profile", "bad", *args], capture_output=True, text=True, timeout=60,
                        env={**os.environ, **env})
    assert cp.returncode == 1, cp.stdout
    assert cp.stderr.count("\n") == 1 and message in cp.stderr and "Traceback" not in cp.stderr, cp.stderr
    assert not (ipython_dir / "profile_bad" / "security" / "ipmtc-cluster.json").exists()
