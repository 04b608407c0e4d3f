"""The one choke point for subprocesses and for stopping process groups.

Everything ipmtc runs goes through :func:`run` (list argv, no shell, a timeout,
a useful error) and everything it stops goes through :func:`stop_pids`
(TERM -> wait -> KILL, by PID / process group, never by name).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence

from .errors import CommandError


def run(argv: Sequence[str], *, timeout_s: float = 30.0, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell) and return its completed process with text output."""
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                            env=env, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise CommandError(f"{argv[0]}: command not found; install it or put it on PATH") from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"{' '.join(argv)} did not finish within {timeout_s:g} s") from None
    if check and cp.returncode != 0:
        tail = (cp.stderr or cp.stdout).strip().splitlines()[-3:]
        raise CommandError(f"{' '.join(argv)} exited with {cp.returncode}: {' | '.join(tail)}")
    return cp


def alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (zombies are reaped late here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
        return False
    return state not in ("Z", "X")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (that exist now), parents first."""
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.Error:
        return []


def pids_with_env(marker: str) -> list[int]:
    """Live PIDs (not zombies, not this one) whose initial environment holds ``marker``.

    E.g. ``IPYTHONDIR=/tmp/x``: every process started under a private IPython
    directory inherits it, so leftovers are found by PID, never by name.
    """
    needle = marker.encode()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(int(d)):
            found.append(int(d))
    return found


def start_time(pid: int) -> float | None:
    """When ``pid`` started (to tell a recorded process from a later one reusing its PID)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_pids(pids: Iterable[int], *, groups: Iterable[int] = (), grace_s: float = 5.0) -> list[int]:
    """Stop processes and process groups: TERM, wait up to ``grace_s``, then KILL.

    ``groups`` are process-group ids (leaders started with a new session).
    Returns the pids that were still alive after KILL (normally none).
    """
    pids = {p for p in pids if p and p != os.getpid()}
    groups = {g for g in groups if g and g != os.getpgid(0)}
    for g in groups:
        _signal(g, signal.SIGTERM, True)
    for p in pids:
        _signal(p, signal.SIGTERM, False)
    everyone = pids | groups
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in everyone):
        time.sleep(0.05)
    for g in groups:
        # the leader may be gone while other members of its group live on
        _signal(g, signal.SIGKILL, True)
    for p in pids:
        if alive(p):
            _signal(p, signal.SIGKILL, False)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(alive(p) for p in everyone):
        time.sleep(0.02)
    return [p for p in everyone if alive(p)]
