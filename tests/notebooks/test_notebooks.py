"""Execute the example notebooks against a real local cluster with a real Jupyter kernel.

Each notebook ends with a cell of ``assert`` statements, so a clean execution is
the test. Every cluster started here is stopped in a ``finally``, and every
process it recorded must be gone afterwards.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

import ipmtc
from ipmtc import _proc
from ipmtc.cluster import start, stop

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
ENGINES = 3

# per notebook: text that must appear in its executed outputs
EXPECTED = {
    "01-attach-and-map.ipynb": ["engines: [0, 1, 2]", "[stdout:0]", "'schedule': 'dynamic'", "'schedule': 'static'",
                                "TaskRecord(index=0", "all checks passed"],
    "02-failures-and-retries.ipynb": ["solver diverged", "WalltimeExceeded", "'retries':",
                                      "all checks passed"],
}

# appended to the executed copy only: which interpreter ran the kernel
PROBE = ("import json, sys\n"
         "print('IPMTC-PROBE ' + json.dumps({'prefix': sys.prefix, 'ipmtc': __import__('ipmtc').__file__}))")


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") in ("execute_result", "display_data"):
        return output.get("data", {}).get("text/plain", "")
    if output.get("output_type") == "error":
        return "\n".join(output.get("traceback", []))
    return ""


def _outputs(nb) -> str:
    return "\n".join(_text(o) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_notebooks_are_committed_clean():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not cleared"
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_against_real_cluster(name, ipython_dir, tmp_path, monkeypatch):
    # ipython_dir (tests/conftest.py): a private temporary IPYTHONDIR; after the test it checks
    # that no process carrying it in its environment (controller, engines, the kernel) is left
    ipdir = Path(ipython_dir)
    workdir = tmp_path / "work"
    workdir.mkdir()
    profile = f"nbtest-{uuid.uuid4().hex[:8]}"
    # the kernel subprocess inherits os.environ: the private IPython dir and the profile to attach to
    monkeypatch.setenv("IPYTHONDIR", str(ipdir))
    monkeypatch.setenv("IPMTC_PROFILE", profile)
    # a test run inside a batch job must not pick up the job (local launcher below anyway)
    for var in ("SLURM_JOB_ID", "SLURM_JOBID", "PBS_JOBID", "LSB_JOBID", "IPMTC_LAUNCHER"):
        monkeypatch.delenv(var, raising=False)

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(new_code_cell(PROBE))

    info = start(engines=ENGINES, profile=profile, flags={"launcher": "local"})
    try:
        assert info.n_engines == ENGINES and len(info.engines) == ENGINES
        assert info.pids and info.launcher_pids
        assert Path(info.profile_dir).parent == ipdir
        client = NotebookClient(nb, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(workdir)}})
        client.execute()  # raises CellExecutionError if any cell errors (the asserts included)
    finally:
        stopped_info, _ = stop(profile)
        assert stopped_info.profile == profile
    dead_or_not = {pid: _proc.alive(pid) for pid in set(info.pids) | set(info.launcher_pids)}
    assert not any(dead_or_not.values()), f"cluster processes still alive after stop: {dead_or_not}"
    assert not (Path(info.profile_dir) / "security" / "ipmtc-cluster.json").exists()

    out = _outputs(nb)
    for expected in EXPECTED[name]:
        assert expected in out, f"{name}: {expected!r} not in the executed outputs"
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))

    # the kernel was this virtual environment's Python, importing this checkout's ipmtc
    probe = json.loads(out.split("IPMTC-PROBE ", 1)[1].splitlines()[0])
    assert os.path.realpath(probe["prefix"]) == os.path.realpath(sys.prefix)
    assert os.path.realpath(probe["ipmtc"]) == os.path.realpath(ipmtc.__file__)
