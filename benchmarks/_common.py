"""Shared plumbing of the benchmarks: private IPYTHONDIR, clusters that are always stopped, tables.

Every benchmark runs its clusters under its own temporary IPYTHONDIR. Clusters
are stopped in ``finally`` (ipmtc's own stop, ipyparallel's own stop) and, as a
last resort, every process whose environment carries that private IPYTHONDIR
(found by PID in /proc, never by name) is SIGKILLed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ipmtc import _proc

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
PY = sys.executable


def noop(x):
    return x


def sleep_task(t):
    import time

    time.sleep(t)
    return t


def flaky_sleep(args):
    """The fault scenario's task: sleep, and fail with probability ``p`` (each attempt)."""
    import random
    import time

    t, p = args
    time.sleep(t)
    if random.random() < p:
        raise RuntimeError("random failure (10% of attempts)")
    return t


def poisoned_sleep(args):
    """Sleep; the poisoned input kills the engine it runs on (as an OOM kill or a segfault in C would)."""
    import os
    import signal
    import time

    t, poisoned = args
    if poisoned:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(t)
    return t


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for the test suite")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    return ap


def private_ipython_dir(name: str) -> Path:
    """A fresh IPYTHONDIR for this process and everything it starts."""
    d = Path(tempfile.mkdtemp(prefix=f"ipmtc-bench-{name}-"))
    os.environ["IPYTHONDIR"] = str(d)
    # engines, process pools and MPI workers import the task functions from this folder
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    for var in list(os.environ):  # a benchmark is never part of a batch job's cluster
        if var.startswith(("SLURM_", "PBS_", "LSB_", "IPMTC_")):
            del os.environ[var]
    return d


def processes_with_env(marker: str) -> list[int]:
    return _proc.pids_with_env(marker)


def kill_leftovers(ipython_dir: Path, grace_s: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process started under ``ipython_dir`` (found by PID). Returns them."""
    marker = f"IPYTHONDIR={ipython_dir}"
    deadline = time.monotonic() + grace_s  # first give stopping processes time to exit on their own
    while processes_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [p for p in processes_with_env(marker) if _proc.alive(p)]
    for p in pids:
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            print(f"leftover process {p}: {cmd[:160]}", file=sys.stderr)
    _proc.stop_pids(pids, grace_s=grace_s)
    return pids


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (an engine and its nanny: a lost node)."""
    for p in _proc.process_tree(pid):
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


@contextlib.contextmanager
def ipmtc_cluster(n: int, profile: str | None = None, **flags):
    """An ipmtc cluster of ``n`` local engines: yields (ClusterInfo, connected Client); always stopped."""
    import ipmtc

    profile = profile or f"bench-{uuid.uuid4().hex[:6]}"
    info = ipmtc.start(engines=n, profile=profile, flags={"launcher": "local", **flags})
    rc = None
    try:
        rc = ipmtc.connect(profile)
        rc.wait_for_engines(n, timeout=120)
        yield info, rc
    finally:
        if rc is not None:
            rc.close()
        ipmtc.stop(profile)


@contextlib.contextmanager
def raw_cluster(n: int, **kwargs):
    """A raw ipyparallel cluster with its defaults (``ipp.Cluster(n=n)``): yields (Cluster, Client)."""
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=n, profile=f"raw-{uuid.uuid4().hex[:6]}", log_level=40, **kwargs)
    rc = None
    try:
        rc = cluster.start_and_connect_sync(activate=False)
        rc.wait_for_engines(n, timeout=180)
        yield cluster, rc
    finally:
        if rc is not None:
            rc.close()
        with contextlib.suppress(Exception):
            cluster.stop_cluster_sync()


def grow(cluster, rc, n_total: int, timeout_s: float = 300.0) -> None:
    """Add engines to a running cluster (ipyparallel's Cluster) until ``n_total`` are registered."""
    have = len(rc.ids)
    if have < n_total:
        cluster.start_engines_sync(n=n_total - have)
        rc.wait_for_engines(n_total, timeout=timeout_s)


def engine_pids(rc) -> dict[int, int]:
    return dict(zip(rc.ids, rc[:].apply_sync(os.getpid)))


def venv_bin(name: str) -> str:
    p = Path(PY).parent / name
    return str(p) if p.exists() else (shutil.which(name) or name)


def mpi_run(n_workers: int, args: list[str], timeout_s: float = 600) -> dict[str, Any]:
    """Run benchmarks/_mpi_pool.py under ``mpiexec -n n_workers+1`` (mpi4py.futures); its JSON output."""
    argv = [venv_bin("mpiexec"), "-n", str(n_workers + 1), PY, "-m", "mpi4py.futures",
            str(HERE / "_mpi_pool.py"), *args]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise RuntimeError(f"mpiexec exited with {cp.returncode}: {cp.stderr.strip()[-800:]}")
    return json.loads(cp.stdout.strip().splitlines()[-1])


def median(xs):
    return statistics.median(xs) if xs else None


def machine() -> dict[str, Any]:
    import ipyparallel

    try:
        import ipmtc

        v = ipmtc.__version__
    except Exception:
        v = "?"
    return {"host": platform.node(), "cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "ipyparallel": ipyparallel.__version__, "ipmtc": v,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['host']}, {m['cores']} cores, load average {m['loadavg'][0]:.2f} at start, Python {m['python']}, "
            f"ipyparallel {m['ipyparallel']}, ipmtc {m['ipmtc']}, {m['date']}")


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out: Path, name: str, markdown: str, data: dict[str, Any]) -> None:
    """``<out>/<name>.md`` and ``<name>.json``; the Markdown goes to stdout too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    print(markdown)
    sys.stdout.flush()


def new_figure(w: float = 7.0, h: float = 4.5, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes
