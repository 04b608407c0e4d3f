"""The presets ship inside the wheel: build it, install it into a fresh venv, list them from there."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_presets(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                   check=True, timeout=300)
    (wheel,) = dist.glob("ipmtc-*.whl")
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # dependencies come from the test venv (appended after the fresh venv's own site-packages,
    # whose copy of ipmtc therefore wins); ipmtc itself only from the wheel
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, timeout=300)
    out = subprocess.run([str(venv / "bin" / "ipmtc"), "presets", "list"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == ["debug", "dynamic", "large", "static"]
    where = subprocess.run([str(py), "-c", "import ipmtc.presets as p; print(p.builtin_dir())"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert where == str(site / "ipmtc" / "profiles")
