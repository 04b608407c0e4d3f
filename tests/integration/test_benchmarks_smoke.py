"""The benchmark scripts run end to end at --smoke size: each writes its Markdown table and PNG.

No timing is asserted. The scripts run at the same time (most of their time is spent waiting for
engines to register), each under a TMPDIR of this test, so that its private IPYTHONDIR can be checked
afterwards: no process started under it may be left running.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import wait_all_dead

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
OUTPUTS = {
    "startup": ["startup.md", "startup.png", "startup.json"],
    "throughput": ["throughput.md", "throughput.png", "throughput.json"],
    "weak_scaling": ["weak_scaling.md", "weak_scaling.png", "weak_scaling_timeline_static.png",
                     "weak_scaling_timeline_dynamic.png"],
    "faults": ["faults.md", "faults.png", "faults_run.json"],
    "model": ["model.md", "model.png"],
    "memory": ["memory.md", "memory.json"],
    "security": ["security.md", "security.json"],
    "scale": ["scale.md", "scale.json"],
}


def _leftovers(prefix: str) -> list[int]:
    needle = f"IPYTHONDIR={prefix}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                env = (d / "environ").read_bytes().split(b"\0")
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if stat not in ("Z", "X") and any(v.startswith(needle) for v in env):
                out.append(int(d.name))
    return out


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench")
    tmp, out = base / "tmp", base / "out"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "LSB_", "IPMTC_"))}
    env["TMPDIR"] = str(tmp)
    procs = {}
    for name in OUTPUTS:
        procs[name] = subprocess.Popen([sys.executable, str(BENCH / f"{name}.py"), "--smoke", "--out", str(out)],
                                       cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    results = {}
    deadline = time.monotonic() + 420
    for name, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        results[name] = (p.returncode, stdout, stderr)
    # what a benchmark stopped as it ended may take a moment to exit: wait for that, not for a fixed time
    yield out, results, wait_all_dead(_leftovers(str(tmp)), timeout_s=10)


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_benchmark_smoke(smoke_runs, name):
    out, results, _ = smoke_runs
    rc, stdout, stderr = results[name]
    assert rc == 0, f"{name} exited with {rc}\n{stderr[-3000:]}"
    assert stdout.lstrip().startswith("###") and "\n|---|" in stdout  # the Markdown table on stdout
    for f in OUTPUTS[name]:
        path = out / f
        assert path.exists() and path.stat().st_size > 0, f"{name}: {f} missing"
        if f.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / f"{name}.md").read_text().strip() == stdout.strip()


def test_benchmarks_leave_nothing_running(smoke_runs):
    _, _, left = smoke_runs
    assert not left, f"processes left running by the benchmarks: {left}"


def test_run_all_writes_results_md(smoke_runs, tmp_path):
    """run_all collects the tables and pictures into RESULTS.md (here: of the smoke runs above)."""
    out, _, _ = smoke_runs
    results = tmp_path / "RESULTS.md"
    cp = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--no-run", "--out", str(out), "--results",
                         str(results), "--only", *OUTPUTS], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert cp.returncode == 0, cp.stderr[-2000:]
    text = results.read_text()
    # the machine line: run_all's own host and core count
    assert f"Machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}," in text, \
        text[:500]
    for name, files in OUTPUTS.items():
        assert f"{name}.png" not in files or f"{name}.png)" in text, name
    assert "### Model" in text and "### Weak scaling" in text and "### Memory" in text and "FAILED" not in text
