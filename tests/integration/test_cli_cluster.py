"""The real `ipmtc` command around a real cluster: start/status/list/stop and --foreground."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from ipmtc import cluster

from ..conftest import processes_with_env, wait_all_dead

IPMTC = [sys.executable, "-m", "ipmtc"]


def run(*args, timeout=120):
    return subprocess.run([*IPMTC, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_start_status_list_stop(ipython_dir):
    cp = run("start", "--engines", "3", "--profile", "clitest", "--launcher", "local")
    assert cp.returncode == 0, cp.stderr
    assert "engines 3/3 registered" in cp.stderr
    assert "3 engines registered in" in cp.stdout and "ipmtc.connect(profile='clitest')" in cp.stdout
    st = run("status", "--profile", "clitest")
    assert st.returncode == 0 and "engines: 3/3 registered" in st.stdout and "tasks:" in st.stdout
    assert "key" not in st.stdout.lower()
    assert "clitest" in run("list").stdout
    again = run("start", "--engines", "3", "--profile", "clitest", "--launcher", "local")
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already running" in again.stderr
    info = cluster.find("clitest")
    sp = run("stop", "--profile", "clitest")
    assert sp.returncode == 0 and "stopped cluster clitest" in sp.stdout
    assert not wait_all_dead(info.pids + info.launcher_pids)
    gone = run("stop", "--profile", "clitest")
    assert gone.returncode == 1 and gone.stderr.startswith("ipmtc: error: no ipmtc cluster")


def test_foreground_stops_everything_on_sigterm(ipython_dir):
    p = subprocess.Popen([*IPMTC, "start", "--engines", "2", "--profile", "fg", "--launcher", "local",
                          "--foreground"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        info = None
        while time.monotonic() < deadline:
            try:
                info = cluster.find("fg")
                break
            except Exception:
                time.sleep(0.2)
        assert info is not None and info.running
        assert p.poll() is None  # still in the foreground
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not wait_all_dead(info.pids + info.launcher_pids)
    assert not wait_all_dead(processes_with_env(f"IPYTHONDIR={ipython_dir}"))
