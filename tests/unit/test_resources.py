"""ipmtc.resources and the pool part of ipmtc.launch: pools laid out on a node, GPUs found, launch arguments."""
from __future__ import annotations

import os

import pytest

from ipmtc import presets
from ipmtc.allocation import detect
from ipmtc.errors import ResourceError
from ipmtc.launch import plan_engines
from ipmtc.resources import Pool, PoolLayout, bind_engine, layout, local_index, node_gpus, parse_pool, share


def test_parse_pool():
    assert parse_pool("gpu:gpus-per-engine=1") == Pool("gpu", None, 1, None, None)
    assert parse_pool("cpu:cores_per_engine=2, engines-per-node=3") == Pool("cpu", 2, 0, 3, None)
    assert parse_pool("plain") == Pool("plain")
    for bad, msg in [("x:cores-per-engine=0", "must be >= 1"), ("x:cores-per-engine=two", "whole number"),
                     ("x:memory=4", "not KEY=VALUE"), (":cores-per-engine=1", "needs a name")]:
        with pytest.raises(ResourceError, match=msg):
            parse_pool(bad)


def test_layout_gpu_pool_then_cpu_pool_on_the_rest():
    gpu, cpu = layout([Pool("gpu", gpus_per_engine=1), Pool("cpu")], cores_per_node=16, gpus_per_node=4)
    assert (gpu.engines_per_node, gpu.cores_per_engine, gpu.core_offset, gpu.gpu_offset) == (4, 1, 0, 0)
    assert cpu.hide_gpus and not gpu.hide_gpus
    assert (cpu.engines_per_node, cpu.cores_per_engine, cpu.core_offset) == (12, 1, 4)
    assert gpu.node_cores == cpu.node_cores == 16


def test_layout_single_gpu_pool_shares_cores_evenly():
    (p,) = layout([Pool(gpus_per_engine=2)], cores_per_node=64, gpus_per_node=8)
    assert (p.engines_per_node, p.cores_per_engine, p.threads_per_engine) == (4, 16, 16)


def test_layout_cores_per_engine_and_threads():
    (p,) = layout([Pool(cores_per_engine=4, threads_per_engine=2)], cores_per_node=16, gpus_per_node=0)
    assert (p.engines_per_node, p.cores_per_engine, p.threads_per_engine) == (4, 4, 2)


@pytest.mark.parametrize("pools, cores, gpus, msg", [
    ([Pool(cores_per_engine=8)], 4, 0, "8 cores per engine, but a node has 4 cores in all; ask for at most 4"),
    ([Pool(gpus_per_engine=1)], 4, 0, "a node has no GPUs"),
    ([Pool(gpus_per_engine=5)], 4, 4, "5 GPUs per engine, but a node has 4 GPUs in all"),
    ([Pool("a"), Pool("b")], 4, 0, "pool 'b': no cores left"),
    ([Pool(cores_per_engine=2, engines_per_node=3)], 4, 0, "3 engines x 2 cores per node"),
])
def test_layout_errors(pools, cores, gpus, msg):
    with pytest.raises(ResourceError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        layout(pools, cores, gpus)


def test_node_gpus_sources_in_order(monkeypatch):
    assert node_gpus({"CUDA_VISIBLE_DEVICES": "2,5", "SLURM_JOB_GPUS": "0,1,2,3"}, probe=False).ids == ("2", "5")
    g = node_gpus({"ROCR_VISIBLE_DEVICES": "1"}, probe=False)
    assert g.ids == ("1",) and g.vars == ("ROCR_VISIBLE_DEVICES",)  # HIP would filter twice otherwise
    g = node_gpus({"SLURM_JOB_GPUS": "4,5,6,7"}, probe=False)
    assert g.ids == ("4", "5", "6", "7") and "CUDA_VISIBLE_DEVICES" in g.vars and "ZE_AFFINITY_MASK" in g.vars
    assert node_gpus({"SLURM_GPUS_ON_NODE": "2"}, probe=False).ids == ("0", "1")
    assert node_gpus({"CUDA_VISIBLE_DEVICES": ""}, probe=False).ids == ()
    assert node_gpus({"PATH": "/nonexistent"}).ids == ()  # no nvidia-smi here: nothing


def test_local_index_and_share():
    assert local_index({"SLURM_LOCALID": "0", "MPI_LOCALRANKID": "1"}) == 1  # hydra under Slurm: its own first
    assert local_index({"SLURM_LOCALID": "3"}) == 3
    assert local_index({"MPI_LOCALRANKID": "1"}) == 1
    assert local_index({"SLURM_LOCALID": "3"}, copy=0) == 0
    assert share([0, 1, 2, 3], 2, 2) == (2, 3)
    assert share([0, 1], 2, 2) == (0, 1)  # oversubscribed test node: wraps around the real CPUs


def test_bind_engine_keeps_a_launchers_gpu_binding():
    env = {"CUDA_VISIBLE_DEVICES": "5"}  # srun --gpus-per-task=1 gave this engine one GPU already
    spec = PoolLayout("gpu", 4, 1, 1, 1, pool_cores=4, node_cores=4, pin="fit")
    before = os.sched_getaffinity(0)
    try:
        assert bind_engine(spec, 3, env)["gpus"] == ["5"]
    finally:
        os.sched_setaffinity(0, before)


def test_bind_engine_sets_threads_and_gpus_without_touching_others():
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    spec = PoolLayout("gpu", engines_per_node=4, cores_per_engine=1, gpus_per_engine=1, threads_per_engine=1,
                      pool_cores=4, node_cores=4, pin="fit")
    before = os.sched_getaffinity(0)
    try:
        done = bind_engine(spec, 2, env)
    finally:
        os.sched_setaffinity(0, before)
    assert done["gpus"] == ["2"] and env["CUDA_VISIBLE_DEVICES"] == "2" and env["OMP_NUM_THREADS"] == "1"
    assert env["IPMTC_POOL"] == "gpu" and env["IPMTC_ENGINE_CORES"] == "2"
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    alone = PoolLayout("default", 2, 1, 0, 1, pool_cores=2, node_cores=2, pin="fit")
    try:
        bind_engine(alone, 0, env)
    finally:
        os.sched_setaffinity(0, before)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"  # no GPU pool asked: GPUs are left as they are
    env = {}
    cpu = PoolLayout("cpu", 2, 1, 0, 1, pool_cores=2, node_cores=2, pin="fit", hide_gpus=True)
    try:
        bind_engine(cpu, 0, env)
    finally:
        os.sched_setaffinity(0, before)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["ZE_AFFINITY_MASK"] == "-1"  # a CPU engine sees no GPU


SLURM = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_TASKS_PER_NODE": "4(x4)",
         "SLURM_JOB_CPUS_PER_NODE": "16(x4)"}


def _plan(flags, environ=SLURM, gpus=0, monkeypatch=None):
    resolved = presets.resolve(None, flags, {})
    return plan_engines(resolved.preset, detect(environ), gpus_per_node=gpus)


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    for prog in ("srun", "mpiexec"):
        p = tmp_path / prog
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_plan_cores_per_engine_uses_the_jobs_cores_not_its_tasks(fake_srun):
    plan = _plan({"cores_per_engine": 4})
    assert plan.n_engines == 16 and plan.engines_per_node == 4  # 16 cores / 4, on each of 4 nodes
    assert plan.mpi_args[:2] == ("--cpus-per-task", "4") and "--ntasks-per-node" in plan.mpi_args


def test_plan_pools_each_its_own_srun_step(fake_srun):
    plan = _plan({"pools": ["gpu:gpus-per-engine=1", "cpu"]}, gpus=4)
    gpu, cpu = plan.pools
    assert plan.n_engines == 64 and plan.pool_engines(gpu) == 16 and plan.pool_engines(cpu) == 48
    # one forker per node and pool, holding the pool's cores there (it forks the node's engines)
    assert plan.per_node
    assert plan.pool_args(gpu)[:5] == ("--ntasks-per-node", "1", "--cpus-per-task", "4", "--exact")
    assert plan.pool_args(cpu)[:4] == ("--ntasks-per-node", "1", "--cpus-per-task", "12")
    assert plan.pool_args(cpu).count("--ntasks-per-node") == 1 and "--gres=none" in plan.pool_args(cpu)
    assert "pool gpu: 4/node x 1 core, 1 GPU" in plan.describe()


def test_plan_mpi_engines_one_rank_per_engine(fake_srun):
    plan = _plan({"pools": ["gpu:gpus-per-engine=1", "cpu"], "mpi_engines": True}, gpus=4)
    gpu, cpu = plan.pools
    assert not plan.per_node
    assert plan.pool_args(gpu)[:5] == ("--ntasks-per-node", "4", "--cpus-per-task", "1", "--exact")
    assert plan.pool_args(cpu)[:2] == ("--ntasks-per-node", "12")


def test_plan_default_is_unchanged_one_engine_per_task_slot(fake_srun):
    plan = _plan({})
    assert plan.n_engines == 16 and len(plan.pools) == 1 and not plan.resources_asked
    assert plan.pools[0].pin == "fit" and plan.pools[0].threads_per_engine == 1
