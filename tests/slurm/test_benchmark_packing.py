"""benchmarks/packing.py end to end at --smoke size on the session's local Slurm (no timing asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_packing_benchmark_smoke(slurm, tmp_path):
    out = tmp_path / "out"
    cp = subprocess.run([sys.executable, str(BENCH / "packing.py"), "--smoke", "--out", str(out), "--slurm-conf",
                         str(slurm.conf)], capture_output=True, text=True, timeout=600, cwd=BENCH.parent,
                        env=slurm.env(TMPDIR=str(tmp_path)))
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert cp.stdout.lstrip().startswith("### Packing") and "\n|---|" in cp.stdout
    data = json.loads((out / "packing.json").read_text())
    assert data["packed_run_s"] > 0 and data["split_s"] > 0 and data["bound_s"] > 0
