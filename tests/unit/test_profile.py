"""Tests for ipmtc.profile: golden config files, trait names, permissions, names.

Golden files live in tests/unit/golden/<case>/<file>; regenerate them with
``UPDATE_GOLDEN=1 pytest tests/unit/test_profile.py`` and review the diff.
"""
from __future__ import annotations

import os
import socket
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from traitlets.config import Config

from ipmtc import profile
from ipmtc.allocation import Allocation
from ipmtc.errors import PresetError, SecurityError
from ipmtc.launch import EnginePlan, plan_engines
from ipmtc.presets import concretize, resolve

GOLDEN = Path(__file__).parent / "golden"
FILES = ["ipcontroller_config.py", "ipengine_config.py", "ipcluster_config.py", "ipmtc-preset.yaml"]
SLURM4 = Allocation("slurm", "4242", ("n1", "n2", "n3", "n4"), (4, 4, 4, 4))


# ``ipython_dir``: tests/conftest.py's (autouse: a fresh IPYTHONDIR per test, no batch or IPMTC_ variables,
# and no process of the test left running afterwards)


def _dynamic_local_8():
    alloc = Allocation("local", None, ("laptop",), (8,))
    resolved = resolve("dynamic", {}, {})
    plan = plan_engines(resolved.preset, alloc, engines=8)
    assert replace(plan, pools=()) == EnginePlan("local", 8, (socket.gethostname(),), 8)
    return concretize(resolved, plan.n_engines), plan, alloc


def _large_slurm_4x4_srun():
    resolved = concretize(resolve("large", {}, {}), 16)
    plan = EnginePlan(launcher="srun", n_engines=16, hosts=SLURM4.hosts, engines_per_node=4,
                      mpi_cmd=("/usr/bin/srun",),
                      mpi_args=("--nodes", "4", "--ntasks-per-node", "4", "--kill-on-bad-exit=0", "--wait=0"),
                      controller_ip="0.0.0.0", controller_location="10.0.0.1")
    return resolved, plan, SLURM4


CASES = {"dynamic-local-8": _dynamic_local_8, "large-slurm-4x4-srun": _large_slurm_4x4_srun}


def _exec_config(text: str) -> Config:
    cfg = Config()
    exec(compile(text, "<config>", "exec"), {"get_config": lambda: cfg})
    return cfg


# --------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden(case: str) -> None:
    # the interpreter's path is machine-specific: golden files say PYTHON
    files = {k: v.replace(repr(sys.executable), "'PYTHON'") for k, v in profile.render(*CASES[case]()).items()}
    assert sorted(files) == sorted(FILES)
    folder = GOLDEN / case
    if os.environ.get("UPDATE_GOLDEN") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    missing = [name for name in FILES if not (folder / name).is_file()]
    assert not missing, f"golden files missing in {folder}: {missing}; run with UPDATE_GOLDEN=1"
    for name, text in files.items():
        assert text == (folder / name).read_text(), f"{case}/{name} differs from golden (UPDATE_GOLDEN=1)"


def test_dynamic_local_values() -> None:
    files = profile.render(*_dynamic_local_8())
    ctl = _exec_config(files["ipcontroller_config.py"])
    assert ctl.IPController.ip == "127.0.0.1" and ctl.IPController.location == "127.0.0.1"
    assert (ctl.TaskScheduler.scheme_name, ctl.TaskScheduler.hwm) == ("leastload", 1)
    assert (ctl.HeartMonitor.period, ctl.HeartMonitor.max_heartmonitor_misses) == (100, 50)
    assert ctl.IPController.registration_timeout == 30
    assert ctl.IPController.db_class == "DictDB"
    assert "ports" not in ctl.IPController
    eng = _exec_config(files["ipengine_config.py"])
    assert (eng.IPEngine.timeout, eng.IPEngine.max_heartbeat_misses) == (10.0, 300)
    clu = _exec_config(files["ipcluster_config.py"])
    assert (clu.Cluster.engine_launcher_class, clu.Cluster.n, clu.Cluster.engine_timeout) == ("local", 8, 61)
    assert "MPIEngineSetLauncher" not in clu


def test_large_slurm_values() -> None:
    files = profile.render(*_large_slurm_4x4_srun())
    ctl = _exec_config(files["ipcontroller_config.py"])
    assert (ctl.IPController.ip, ctl.IPController.location) == ("0.0.0.0", "10.0.0.1")
    assert ctl.HeartMonitor.period == 30000
    assert ctl.IPController.registration_timeout == 600
    assert ctl.IPController.db_class == "NoDB"
    assert ctl.IPController.log_level == "WARN"
    clu = _exec_config(files["ipcluster_config.py"])
    assert clu.Cluster.engine_launcher_class == "mpi"
    assert clu.Cluster.n == 16
    assert clu.MPIEngineSetLauncher.mpi_cmd == ["/usr/bin/srun"]
    assert clu.MPIEngineSetLauncher.mpi_args == ["--nodes", "4", "--ntasks-per-node", "4",
                                                 "--kill-on-bad-exit=0", "--wait=0"]
    assert "slurm job 4242: 4 nodes n[1-4], 16 slots" in files["ipcluster_config.py"].splitlines()[0]


def test_ports_and_debug_log_level() -> None:
    resolved = concretize(resolve("debug", {"controller_ports": "10101-10120"}, {}), 2)
    files = profile.render(resolved, EnginePlan("local", 2, ("h",), 2), Allocation("local", None, ("h",), (2,)))
    ctl = _exec_config(files["ipcontroller_config.py"])
    assert ctl.IPController.ports == "10101-10120"
    assert ctl.IPController.db_class == "SQLiteDB"
    assert ctl.IPController.log_level == "DEBUG"


def _trait(cls_name: str, attr: str):
    from ipyparallel.cluster import Cluster
    from ipyparallel.cluster.launcher import LocalEngineSetLauncher, MPIEngineSetLauncher
    from ipyparallel.controller.app import IPController
    from ipyparallel.controller.heartmonitor import HeartMonitor
    from ipyparallel.controller.task_scheduler import TaskScheduler
    from ipyparallel.engine.app import IPEngine
    from jupyter_client.session import Session

    classes = {c.__name__: c for c in (Cluster, LocalEngineSetLauncher, MPIEngineSetLauncher, IPController,
                                       HeartMonitor, TaskScheduler, IPEngine, Session)}
    assert cls_name in classes, f"unexpected configurable class {cls_name}"
    trait = classes[cls_name].class_traits(config=True).get(attr)
    assert trait is not None, f"{cls_name}.{attr} is not a configurable trait of ipyparallel"
    return trait


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_setting_is_a_current_ipyparallel_trait(case: str) -> None:
    files = profile.render(*CASES[case]())
    for name in FILES[:3]:
        text = files[name]
        assert "HubFactory" not in text and "EngineFactory" not in text
        cfg = _exec_config(text)
        assert cfg, name
        for cls_name, section in cfg.items():
            for attr, value in section.items():
                trait = _trait(cls_name, attr)
                if cls_name == "IPController" and attr == "db_class":
                    continue  # resolved by IPController's own validator (shortcut names)
                if cls_name == "Cluster" and attr == "engine_launcher_class":
                    assert value in ("local", "mpi")
                    continue
                trait.validate(None, value)  # raises TraitError on a wrong type


def test_render_requires_concretized_preset() -> None:
    alloc = Allocation("local", None, ("h",), (2,))
    with pytest.raises(ValueError, match="heartbeat_period_ms is still 'auto'"):
        profile.render(resolve("dynamic", {}, {}), EnginePlan("local", 2, ("h",), 2), alloc)


# --------------------------------------------------------------------------- writing


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_profile_permissions(ipython_dir: Path) -> None:
    resolved, plan, alloc = _dynamic_local_8()
    pdir = profile.write_profile(resolved, plan, alloc, "ipmtc-local")
    assert pdir == ipython_dir / "profile_ipmtc-local"
    for d in (pdir, pdir / "security", pdir / "log"):
        assert d.is_dir() and _mode(d) == 0o700, d
    written = sorted(p.name for p in pdir.iterdir() if p.is_file())
    assert written == sorted(FILES)
    for name in FILES:
        assert _mode(pdir / name) == 0o600, name
    assert (pdir / "ipcluster_config.py").read_text() == profile.render(resolved, plan, alloc)[
        "ipcluster_config.py"]
    assert not list(pdir.glob("*.tmp"))


def test_write_profile_refuses_dirs_others_may_enter_and_overwrites_files_privately(ipython_dir: Path) -> None:
    pdir = ipython_dir / "profile_again"
    (pdir / "security").mkdir(parents=True)
    os.chmod(pdir, 0o755)
    os.chmod(pdir / "security", 0o700)
    (pdir / "ipengine_config.py").write_text("old")
    os.chmod(pdir / "ipengine_config.py", 0o644)
    resolved, plan, alloc = _dynamic_local_8()
    with pytest.raises(SecurityError, match=r"profile_again is open to other users \(mode 0755\).*chmod 700"):
        profile.write_profile(resolved, plan, alloc, "again")
    assert (pdir / "ipengine_config.py").read_text() == "old"  # nothing written
    os.chmod(pdir, 0o700)
    os.chmod(pdir / "security", 0o777)
    with pytest.raises(SecurityError, match="security is open to other users"):
        profile.write_profile(resolved, plan, alloc, "again")
    os.chmod(pdir / "security", 0o700)
    old = os.umask(0)
    try:
        profile.write_profile(resolved, plan, alloc, "again")
    finally:
        os.umask(old)
    assert _mode(pdir) == 0o700 and _mode(pdir / "security") == 0o700 and _mode(pdir / "log") == 0o700
    assert _mode(pdir / "ipengine_config.py") == 0o600  # replaced by a new private file, not chmod-ed
    assert (pdir / "ipengine_config.py").read_text().startswith("# Generated by ipmtc")


def test_write_profile_machinefile(ipython_dir: Path) -> None:
    alloc = Allocation("pbs", "77.pbs", ("h1", "h2", "h3"), (4, 4, 4), nodefile="/x")
    resolved = concretize(resolve("dynamic", {}, {}), 8)
    plan = EnginePlan("mpiexec", 8, ("h1", "h2"), 4, mpi_cmd=("/opt/mpiexec",),
                      mpi_args=("-disable-auto-cleanup", "-ppn", "4"), controller_ip="0.0.0.0",
                      controller_location="10.0.0.2", machinefile_lines=("h1:4", "h2:4"))
    pdir = profile.write_profile(resolved, plan, alloc, "pbs-77")
    mf = pdir / "machinefile"
    assert mf.read_text() == "h1:4\nh2:4\n"
    clu = _exec_config((pdir / "ipcluster_config.py").read_text())
    assert clu.MPIEngineSetLauncher.mpi_args == ["-disable-auto-cleanup", "-ppn", "4", "-machinefile", str(mf)]
    assert clu.MPIEngineSetLauncher.mpi_cmd == ["/opt/mpiexec"]
    assert _mode(pdir / "ipcluster_config.py") == 0o600


def test_default_name_and_profile_dir(ipython_dir: Path) -> None:
    assert profile.default_name(SLURM4) == "ipmtc-4242"
    assert profile.default_name(Allocation("pbs", "77.pbs01", ("h",), (1,))) == "ipmtc-77.pbs01"
    assert profile.default_name(Allocation("local", None, ("h",), (1,))) == "ipmtc-local"
    assert profile.ipython_dir() == ipython_dir
    assert profile.profile_dir("ipmtc-4242") == ipython_dir / "profile_ipmtc-4242"


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "a b", "-x", "x\n", "é"])
def test_bad_profile_name(name: str) -> None:
    with pytest.raises(PresetError) as e:
        profile.profile_dir(name)
    msg = str(e.value)
    assert msg.startswith(f"profile name {name!r} is not usable as a directory name")
    assert msg.count("\n") == 0


@pytest.mark.parametrize("name", ["x", "ipmtc-123.sched01", "a_b+c", "0"])
def test_good_profile_name(name: str) -> None:
    profile.check_name(name)


def test_write_profile_refuses_bad_name(ipython_dir: Path) -> None:
    resolved, plan, alloc = _dynamic_local_8()
    with pytest.raises(PresetError):
        profile.write_profile(resolved, plan, alloc, "../escape")
    assert not (ipython_dir.parent / "escape").exists()
    assert not ipython_dir.exists() or not any(ipython_dir.iterdir())
