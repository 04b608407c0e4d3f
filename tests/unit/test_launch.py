"""Tests for ipmtc.launch.plan_engines with hand-built allocations.

Launchers are "installed" by putting executables in a tmp dir that becomes
PATH (they are never run). Absence of mpiexec, which the venv ships next to the
interpreter, is simulated by replacing ``find_program`` for that case only.
"""
from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ipmtc import launch
from ipmtc.allocation import Allocation
from ipmtc.errors import AllocationError, IpmtcError, LauncherNotFoundError
from ipmtc.launch import MPIEXEC_KEEP_GOING, SRUN_KEEP_GOING, EnginePlan, find_program, plan_engines
from ipmtc.presets import resolve

HOST = socket.gethostname()
SLURM4 = Allocation("slurm", "123", ("n1", "n2", "n3", "n4"), (4, 4, 4, 4))
LOCAL = Allocation("local", None, (HOST,), (6,))


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def _install(tmp_path, monkeypatch, *names: str) -> dict[str, str]:
    """Put fake, never-run executables on PATH; returns name -> path."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    out = {}
    for name in names:
        path = bindir / name
        path.write_text("#!/bin/sh\nexit 99\n")
        path.chmod(0o755)
        out[name] = str(path)
    monkeypatch.setenv("PATH", str(bindir))
    return out


def _preset(**flags):
    return resolve("dynamic", flags, {}).preset


def _msg(e: pytest.ExceptionInfo) -> str:
    assert isinstance(e.value, IpmtcError)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- local


def test_local_defaults() -> None:
    plan = plan_engines(_preset(), LOCAL)
    assert replace(plan, pools=()) == EnginePlan(launcher="local", n_engines=6, hosts=(HOST,), engines_per_node=6,
                              controller_ip="127.0.0.1", controller_location="127.0.0.1")
    assert plan.describe() == "6 engines on 1 node via local"


def test_local_engines_and_engines_per_node() -> None:
    assert plan_engines(_preset(), LOCAL, engines=3).n_engines == 3
    assert plan_engines(_preset(), LOCAL, engines=20, nodes=1).n_engines == 20  # oversubscribing is allowed
    p = plan_engines(_preset(engines_per_node=5), LOCAL)
    assert (p.n_engines, p.engines_per_node) == (5, 5)
    assert plan_engines(_preset(engines_per_node=5), LOCAL, engines=5).n_engines == 5


def test_local_hostname_comes_from_this_machine() -> None:
    # a local allocation described under another name still runs engines here
    plan = plan_engines(_preset(), Allocation("local", None, ("laptop",), (2,)))
    assert plan.hosts == (HOST,)
    assert plan.controller_ip == "127.0.0.1"


def test_local_errors() -> None:
    with pytest.raises(AllocationError) as e:
        plan_engines(_preset(), LOCAL, nodes=0)
    assert _msg(e) == "--nodes 0: must be at least 1"
    with pytest.raises(AllocationError) as e:
        plan_engines(_preset(), LOCAL, nodes=2)
    msg = _msg(e)
    assert msg.startswith("--nodes 2: no batch allocation here (local: 1 node")
    assert "run inside a Slurm/PBS/LSF job or use --engines" in msg
    with pytest.raises(AllocationError) as e:
        plan_engines(_preset(), LOCAL, engines=0)
    assert _msg(e) == "--engines 0: must be at least 1"
    with pytest.raises(AllocationError) as e:
        plan_engines(_preset(engines_per_node=3), LOCAL, engines=2, nodes=1)
    assert _msg(e) == ("--engines 2 and --engines-per-node 3 disagree on one node; "
                       "give only one of them")


def test_local_with_mpiexec(tmp_path, monkeypatch) -> None:
    progs = _install(tmp_path, monkeypatch, "mpiexec")
    plan = plan_engines(_preset(launcher="mpiexec"), LOCAL, engines=4)
    assert plan.launcher == "mpiexec"
    assert plan.mpi_cmd == (progs["mpiexec"],)
    assert plan.mpi_args == MPIEXEC_KEEP_GOING  # no -ppn and no machine file outside a batch job
    assert plan.machinefile_lines == ()
    assert (plan.n_engines, plan.hosts) == (4, (HOST,))
    assert (plan.controller_ip, plan.controller_location) == ("127.0.0.1", "127.0.0.1")


# --------------------------------------------------------------------------- slurm / srun


def test_slurm_4x4_srun(tmp_path, monkeypatch) -> None:
    progs = _install(tmp_path, monkeypatch, "srun", "mpiexec")
    plan = plan_engines(_preset(), SLURM4)
    assert plan.launcher == "srun"
    assert plan.mpi_cmd == (progs["srun"],)
    assert plan.mpi_args == ("--nodes", "4", "--ntasks-per-node", "4", "--kill-on-bad-exit=0", "--wait=0")
    assert set(SRUN_KEEP_GOING) == {"--kill-on-bad-exit=0", "--wait=0"}
    assert (plan.n_engines, plan.engines_per_node, plan.hosts) == (16, 4, SLURM4.hosts)
    assert plan.machinefile_lines == ()
    assert plan.controller_ip == launch.address_toward(SLURM4.hosts) != "0.0.0.0"  # never all interfaces
    assert plan.controller_location == plan.controller_ip
    assert plan.controller_location not in ("0.0.0.0", "127.0.0.1", "localhost")
    try:
        assert not ipaddress.ip_address(plan.controller_location).is_loopback
    except ValueError:  # no routable address: a host name is the fallback
        assert plan.controller_location == socket.gethostname()
    assert plan.describe() == "16 engines on 4 nodes via srun"


def test_slurm_node_subset_uses_nodelist(tmp_path, monkeypatch) -> None:
    _install(tmp_path, monkeypatch, "srun")
    plan = plan_engines(_preset(), SLURM4, nodes=2)
    assert plan.mpi_args == ("--nodes", "2", "--nodelist", "n1,n2", "--ntasks-per-node", "4",
                             "--kill-on-bad-exit=0", "--wait=0")
    assert (plan.n_engines, plan.hosts) == (8, ("n1", "n2"))
    assert "--nodelist" not in plan_engines(_preset(), SLURM4, nodes=4).mpi_args


@pytest.mark.parametrize(
    ("kwargs", "flags", "n", "epn", "tpn"),
    [
        ({"engines": 8}, {}, 8, 2, "2"),
        ({"engines": 10}, {}, 10, 3, None),  # uneven: srun -n 10 spreads them, no --ntasks-per-node
        ({"engines": 4}, {}, 4, 1, "1"),
        ({}, {"engines_per_node": 2}, 8, 2, "2"),
        ({"engines": 8}, {"engines_per_node": 2}, 8, 2, "2"),
        ({"nodes": 2, "engines": 6}, {}, 6, 3, "3"),
        ({"nodes": 3}, {"engines_per_node": 7}, 21, 7, "7"),
    ],
)
def test_slurm_counts(tmp_path, monkeypatch, kwargs, flags, n, epn, tpn) -> None:
    _install(tmp_path, monkeypatch, "srun")
    plan = plan_engines(_preset(**flags), SLURM4, **kwargs)
    assert (plan.n_engines, plan.engines_per_node) == (n, epn)
    args = plan.mpi_args
    if tpn is None:
        assert "--ntasks-per-node" not in args
    else:
        assert args[args.index("--ntasks-per-node") + 1] == tpn
    assert args[-2:] == SRUN_KEEP_GOING


def test_slurm_uneven_slots(tmp_path, monkeypatch) -> None:
    _install(tmp_path, monkeypatch, "srun")
    alloc = Allocation("slurm", "9", ("a", "b", "c"), (4, 4, 2))
    plan = plan_engines(_preset(), alloc)
    assert (plan.n_engines, plan.engines_per_node) == (10, 4)
    assert "--ntasks-per-node" not in plan.mpi_args


def test_preset_mpi_args_come_last(tmp_path, monkeypatch) -> None:
    _install(tmp_path, monkeypatch, "srun", "mpiexec")
    plan = plan_engines(_preset(mpi_args="--cpu-bind=cores --mem 0"), SLURM4)
    assert plan.mpi_args[-3:] == ("--cpu-bind=cores", "--mem", "0")
    assert plan.mpi_args[:-3][-2:] == SRUN_KEEP_GOING
    plan = plan_engines(_preset(launcher="mpiexec", mpi_args=["-bind-to", "core"]), SLURM4)
    assert plan.mpi_args == ("-disable-auto-cleanup", "-ppn", "4", "-bind-to", "core")


@pytest.mark.parametrize(
    ("flags", "ip", "location"),
    [
        ({"controller_ip": "10.1.2.3"}, "10.1.2.3", "10.1.2.3"),
        ({"controller_location": "head.example.org"}, launch.address_toward(SLURM4.hosts), "head.example.org"),
        ({"controller_ip": "0.0.0.0"}, "0.0.0.0", launch.this_host_address()),  # a site's explicit choice
        ({"controller_ip": "127.0.0.1"}, "127.0.0.1", "127.0.0.1"),
        ({"controller_ip": "10.1.2.3", "controller_location": "10.9.9.9"}, "10.1.2.3", "10.9.9.9"),
    ],
)
def test_controller_address_overrides(tmp_path, monkeypatch, flags, ip, location) -> None:
    _install(tmp_path, monkeypatch, "srun")
    plan = plan_engines(_preset(**flags), SLURM4)
    assert (plan.controller_ip, plan.controller_location) == (ip, location)


def test_one_node_allocation_on_this_host_listens_on_loopback(tmp_path, monkeypatch) -> None:
    _install(tmp_path, monkeypatch, "srun")
    plan = plan_engines(_preset(), Allocation("slurm", "5", (HOST,), (3,)))
    assert plan.launcher == "srun"
    assert (plan.controller_ip, plan.controller_location) == ("127.0.0.1", "127.0.0.1")


def test_batch_allocation_with_local_launcher(tmp_path, monkeypatch) -> None:
    _install(tmp_path, monkeypatch, "srun")
    plan = plan_engines(_preset(launcher="local"), SLURM4)
    assert (plan.launcher, plan.n_engines, plan.hosts, plan.mpi_cmd) == ("local", 4, (HOST,), ())
    assert plan.controller_ip == "127.0.0.1"
    assert plan_engines(_preset(launcher="local"), SLURM4, engines=2, nodes=1).n_engines == 2


def test_local_launcher_in_batch_job_with_several_nodes_message() -> None:
    # BUG: inside a Slurm job, `--launcher local --nodes 2` says "no batch
    # allocation here (slurm job 123: ...)", which contradicts itself.
    with pytest.raises(AllocationError) as e:
        plan_engines(_preset(launcher="local"), SLURM4, nodes=2)
    msg = _msg(e)
    assert "no batch allocation here" not in msg
    assert "--nodes 2" in msg and "local" in msg


@pytest.mark.parametrize(
    ("kwargs", "flags", "message"),
    [
        ({"nodes": 0}, {}, "--nodes 0: must be at least 1"),
        ({"nodes": -1}, {}, "--nodes -1: must be at least 1"),
        ({"nodes": 5}, {}, "--nodes 5 but this slurm allocation 123 has 4 nodes (n[1-4]); ask for at most 4"),
        ({"engines": 2}, {}, "--engines 2 with --nodes 4: fewer engines than nodes; ask for at least 4 "
                             "engines or fewer nodes"),
        ({"engines": 3, "nodes": 4}, {}, "fewer engines than nodes"),
        ({"engines": 8, "nodes": 2}, {"engines_per_node": 3},
         "--engines 8 conflicts with 2 nodes x --engines-per-node 3; give only two of "
         "--nodes/--engines/--engines-per-node"),
        ({"engines": 15}, {"engines_per_node": 4}, "--engines 15 conflicts with 4 nodes x --engines-per-node 4"),
    ],
)
def test_slurm_errors(tmp_path, monkeypatch, kwargs, flags, message) -> None:
    _install(tmp_path, monkeypatch, "srun")
    with pytest.raises(AllocationError) as e:
        plan_engines(_preset(**flags), SLURM4, **kwargs)
    assert message in _msg(e)


# --------------------------------------------------------------------------- mpiexec / PBS / LSF


def test_mpiexec_in_slurm(tmp_path, monkeypatch) -> None:
    progs = _install(tmp_path, monkeypatch, "srun", "mpiexec")
    plan = plan_engines(_preset(launcher="mpiexec"), SLURM4)
    assert plan.launcher == "mpiexec"
    assert plan.mpi_cmd == (progs["mpiexec"],)
    assert plan.mpi_args == ("-disable-auto-cleanup", "-ppn", "4")
    assert plan.machinefile_lines == ()  # hydra reads the Slurm allocation itself
    sub = plan_engines(_preset(launcher="mpiexec"), SLURM4, nodes=2)
    assert sub.machinefile_lines == ("n1:4", "n2:4")
    assert sub.mpi_args == ("-disable-auto-cleanup", "-ppn", "4")
    uneven = plan_engines(_preset(launcher="mpiexec"), SLURM4, engines=10)
    assert uneven.mpi_args == ("-disable-auto-cleanup",)


def test_slurm_without_srun_falls_back_to_mpiexec(tmp_path, monkeypatch) -> None:
    progs = _install(tmp_path, monkeypatch, "mpiexec")
    plan = plan_engines(_preset(), SLURM4)
    assert (plan.launcher, plan.mpi_cmd) == ("mpiexec", (progs["mpiexec"],))


def test_pbs_uses_mpiexec_with_machinefile(tmp_path, monkeypatch) -> None:
    progs = _install(tmp_path, monkeypatch, "mpiexec")
    pbs = Allocation("pbs", "77.pbs", ("h1", "h2", "h3"), (4, 4, 4), nodefile="/var/spool/nodes")
    plan = plan_engines(_preset(), pbs)
    assert plan.launcher == "mpiexec" and plan.mpi_cmd == (progs["mpiexec"],)
    assert plan.machinefile_lines == ("h1:4", "h2:4", "h3:4")
    assert plan.mpi_args == ("-disable-auto-cleanup", "-ppn", "4")
    assert plan.n_engines == 12
    sub = plan_engines(_preset(engines_per_node=6), pbs, nodes=2)
    assert sub.machinefile_lines == ("h1:6", "h2:6")  # more engines than slots: the file says so
    assert (sub.n_engines, sub.mpi_args[-2:]) == (12, ("-ppn", "6"))


def test_lsf_uses_mpiexec_with_machinefile(tmp_path, monkeypatch) -> None:
    _install(tmp_path, monkeypatch, "mpiexec")
    lsf = Allocation("lsf", "5", ("c1", "c2"), (8, 2))
    plan = plan_engines(_preset(), lsf)
    assert plan.launcher == "mpiexec"
    assert plan.machinefile_lines == ("c1:8", "c2:8")
    assert (plan.n_engines, plan.engines_per_node) == (10, 8)
    assert "-ppn" not in plan.mpi_args


# --------------------------------------------------------------------------- missing launchers


def test_srun_asked_for_but_missing() -> None:
    if (Path(sys.executable).parent / "srun").exists():
        pytest.skip("an srun sits next to the interpreter")
    with pytest.raises(LauncherNotFoundError) as e:
        plan_engines(_preset(launcher="srun"), SLURM4)
    assert _msg(e) == ("launcher 'srun' asked for but srun is not installed; run inside a Slurm "
                       "allocation or choose --launcher mpiexec/local")
    with pytest.raises(LauncherNotFoundError):
        plan_engines(_preset(launcher="srun"), LOCAL)


def test_mpiexec_asked_for_but_missing(monkeypatch) -> None:
    monkeypatch.setattr(launch, "find_program", lambda name: None)  # simulate absence
    with pytest.raises(LauncherNotFoundError) as e:
        plan_engines(_preset(launcher="mpiexec"), SLURM4)
    assert _msg(e) == ("launcher 'mpiexec' asked for but mpiexec is not installed; "
                       "pip install 'ipmtc[mpi]' (the mpich wheel provides mpiexec)")


def test_slurm_with_no_launcher_at_all(monkeypatch) -> None:
    monkeypatch.setattr(launch, "find_program", lambda name: None)
    with pytest.raises(LauncherNotFoundError) as e:
        plan_engines(_preset(), SLURM4)
    assert "launcher 'srun' asked for but srun is not installed" in _msg(e)
    # the local launcher needs nothing installed
    assert plan_engines(_preset(), LOCAL).launcher == "local"


def test_find_program(tmp_path, monkeypatch) -> None:
    progs = _install(tmp_path, monkeypatch, "srun")
    assert find_program("srun") == progs["srun"]
    notexec = Path(progs["srun"]).parent / "plainfile"
    notexec.write_text("")
    assert find_program("plainfile") is None
    assert find_program("no-such-program-ipmtc") is None
    # next to this Python (a venv's mpiexec from the mpich wheel) even when not on PATH
    me = Path(sys.executable).name
    assert find_program(me) == str(Path(sys.executable).parent / me)


def test_this_host_address_is_usable_by_other_nodes() -> None:
    addr = launch.this_host_address()
    assert addr
    try:
        assert not ipaddress.ip_address(addr).is_loopback
    except ValueError:
        assert addr == socket.gethostname()


def test_engine_plan_describe() -> None:
    assert EnginePlan("mpiexec", 2, ("a",), 2).describe() == "2 engines on 1 node via mpiexec"
    assert EnginePlan("srun", 6, ("a", "b", "c"), 2).describe() == "6 engines on 3 nodes via srun"


def test_security_mode(monkeypatch) -> None:
    """auto is curve wherever libzmq has it (loopback too); without it: hmac on loopback with a warning,
    refused beyond loopback; an explicit curve without it is refused; hmac is hmac."""
    import zmq

    from ipmtc.errors import SecurityError, SecurityWarning

    assert launch.security_mode("hmac", "10.1.2.3") == "hmac"
    if zmq.has("curve"):
        assert launch.security_mode("auto", "127.0.0.1") == launch.security_mode("auto", "10.1.2.3") == "curve"
    monkeypatch.setattr(zmq, "has", lambda what: what != "curve")
    with pytest.warns(SecurityWarning, match="signed but not encrypted"):
        assert launch.security_mode("auto", "127.0.0.1") == "hmac"
    with pytest.raises(SecurityError, match="the controller listens on 10.1.2.3 needs CurveZMQ"):
        launch.security_mode("auto", "10.1.2.3")
    with pytest.raises(SecurityError, match="security: curve needs CurveZMQ"):
        launch.security_mode("curve", "127.0.0.1")
