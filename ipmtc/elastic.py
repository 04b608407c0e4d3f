"""Engines that join and leave a running cluster: ``ipmtc add`` and ``ipmtc remove``.

**Join.** :func:`add` starts more engines for a running cluster with the same launchers as ``ipmtc
start`` (local forks, srun, mpiexec), from wherever it runs: the cluster's own allocation, or another
batch job's script (the engines then run on that job's nodes and reach the controller through the
connection file in the shared profile). Maps in progress take new engines in at once. Each engine
knows its origin (``IPMTC_ORIGIN``: ``slurm job 123`` or ``local host``), which ``ipmtc status`` shows.

**Leave.** :func:`remove` drains engines: their ids go into ``security/ipmtc-leaving.json`` (maps read
it and hand them nothing more), and each is asked to leave (:func:`leave`): between two messages, once
no chunk has come for :data:`LEAVE_QUIET_S`, it exits with status 0 -- its node's forker does not
restart it, and a map counts it neither as a loss nor as a failure (whatever was still queued on it is
handed out again, uncharged).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import _ipp, _proc, cluster
from ._private import PRIVATE_UMASK, write_private
from .errors import ClusterError, NoClusterError, StartupError
from .notes import LEAVING_FILE, leaving_path, read_leaving  # noqa: F401 (LEAVING_FILE: the file's name, for users)

LEAVE_QUIET_S = 2.0  # an engine asked to leave exits once no chunk came for this long (maps look every 0.1 s)
ADD_TIMEOUT_S = 300.0


def origin_of(environ: Mapping[str, str]) -> str:
    """Where engines started from here come from: ``slurm job 123``, ``pbs job 7.server`` or ``local host``."""
    from .allocation import detect

    alloc = detect(environ)
    return f"{alloc.kind} job {alloc.job_id}" if alloc.is_batch else f"local {socket.gethostname()}"


# ---------------------------------------------------------------- join


@dataclass
class Added:
    """Engines one :func:`add` started: their origin, ids, and the launcher processes (this host's)."""

    origin: str
    ids: list[int]
    host: str
    launcher_pids: list[int]
    pids: list[int]


def add(profile: str | None = None, *, engines: int | None = None, nodes: int | None = None,
        preset: str | None = None, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
        timeout_s: float | None = None, on_progress: Callable[[int, int], None] | None = None) -> Added:
    """Start more engines for the running cluster of ``profile``; returns once they all registered.

    Counts and resources as for ``ipmtc start`` (``--engines``, ``--nodes``, ``--cores-per-engine``,
    pools...), for the allocation this runs in. On failure nothing it started is left running.
    """
    import ipyparallel as ipp

    environ = os.environ if environ is None else environ
    info = cluster.find(profile, environ)
    if not info.running:
        raise NoClusterError(f"the cluster under profile {info.profile!r} is not running; start it first")
    setup = cluster.resolve_setup(preset=preset, flags=flags, nodes=nodes, engines=engines, profile=info.profile,
                                  environ=environ)
    plan = setup.plan
    if not plan.resources_asked:  # beside the cluster's own engines on a node: share its CPUs, do not pin over them
        plan = replace(plan, pools=tuple(replace(p, pin="none") for p in plan.pools))
    pdir = Path(info.profile_dir)
    origin = origin_of(environ)
    machinefile = pdir / f"machinefile-{os.getpid()}"
    if plan.machinefile_lines:
        write_private(machinefile, "\n".join(plan.machinefile_lines) + "\n")
    client = cluster.connect(info.profile, wait_for_engines=False)
    tag = uuid.uuid4().hex[:12]  # this add's engines note it: another add beside this one must not count them
    # (no cluster file of its own: it would replace, then remove, the one ipyparallel keeps for the cluster)
    engines_cluster = ipp.Cluster(profile_dir=str(pdir), cluster_id="", cluster_file="", shutdown_atexit=False,
                                  log_level=30,
                                  engine_launcher_class="local" if plan.launcher == "local" else "mpi")
    timeout_s = float(timeout_s or setup.resolved.preset.start_timeout_s or ADD_TIMEOUT_S)
    try:
        old = os.umask(PRIVATE_UMASK)
        try:
            cluster.start_engine_sets(engines_cluster, plan, int(setup.resolved.preset.engine_restarts),
                                      machinefile=machinefile, mpi_cmd=plan.mpi_cmd, ends_at=setup.ends_at,
                                      extra_env={"IPMTC_ORIGIN": origin, cluster.ADD_TAG_ENV: tag})
        finally:
            os.umask(old)
        new = _wait_new(engines_cluster, client, pdir, tag, plan.n_engines, timeout_s, on_progress)
        launchers = _ipp.launcher_pids(engines_cluster)
        pids = sorted({p for lp in launchers for p in _proc.process_tree(lp)})
        added = Added(origin, new, socket.gethostname(), launchers, pids)
        _record(info, client, added)
        return added
    except BaseException as e:
        launchers = _ipp.launcher_pids(engines_cluster)
        _proc.stop_pids({p for lp in launchers for p in _proc.process_tree(lp)}, groups=launchers, grace_s=3.0)
        if isinstance(e, (KeyboardInterrupt, ClusterError)):
            raise
        raise StartupError(f"ipmtc add failed: {type(e).__name__}: {e}; nothing it started was left running") from e
    finally:
        client.close()


def _wait_new(engines_cluster: Any, client: Any, pdir: Path, tag: str, n: int, timeout_s: float,
              on_progress: Callable[[int, int], None] | None) -> list[int]:
    """Wait until ``n`` engines of this add registered: those whose notes carry ``tag`` (an engine notes itself
    within a moment of registering), and that the controller lists."""
    deadline = time.monotonic() + timeout_s
    last = -1
    while True:
        ids = set(client.ids)
        new = sorted(int(i) for i, note in cluster.engine_notes(pdir).items() if note.get("tag") == tag
                     and i.isdigit() and int(i) in ids)
        if len(new) != last and on_progress:
            on_progress(len(new), n)
        last = len(new)
        if len(new) >= n:
            return new
        launchers = _ipp.launcher_pids(engines_cluster)
        if launchers and not any(_proc.alive(p) for p in launchers):
            raise StartupError(f"the added engines' processes exited ({len(new)}/{n} registered); see the logs "
                               "in the profile's log/ folder")
        if time.monotonic() > deadline:
            raise StartupError(f"only {len(new)}/{n} added engines registered within {timeout_s:g} s")
        time.sleep(0.1)


def _record(info: cluster.ClusterInfo, client: Any, added: Added) -> None:
    """Note the new engines (where they run, their origin) and processes in the cluster's state file."""
    # what the new engines noted about themselves (a map may keep them too busy for an apply; _wait_new counted
    # only engines whose notes it read)
    notes = cluster.engine_notes(Path(info.profile_dir))
    with cluster.updating(info.profile) as fresh:  # another add may write it at the same time
        fresh.engines.update({str(i): notes[str(i)] for i in added.ids if str(i) in notes})
        fresh.n_engines += len(added.ids)
        fresh.added.append({"origin": added.origin, "host": added.host, "ids": added.ids,
                            "launcher_pids": added.launcher_pids, "pids": added.pids,
                            "pid_times": {str(p): t for p in added.pids if (t := _proc.start_time(p))}})


def stop_added(added: Added, info: cluster.ClusterInfo | None = None, *, drain: bool = True,
               timeout_s: float = 60.0) -> None:
    """The engines of one :func:`add` leave (drained first, ``drain``), then its launchers are stopped."""
    if drain:
        try:
            remove(info.profile if info else None, ids=added.ids, timeout_s=timeout_s)
        except ClusterError:
            pass
    _proc.stop_pids(set(added.pids), groups=added.launcher_pids, grace_s=5.0)


def wait_then_leave(added: Added, profile: str, *, drain_timeout_s: float = 60.0) -> None:
    """``ipmtc add --foreground``: block until SIGTERM/SIGINT (the job's walltime warning, scancel) or the
    cluster ends, then drain this add's engines and stop its launchers -- other jobs' engines carry on."""
    stop_now = False

    def _handler(signum: int, frame: object) -> None:
        nonlocal stop_now
        stop_now = True

    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        info = cluster.find(profile)
        while not stop_now and info.running and any(_proc.alive(p) for p in added.launcher_pids):
            time.sleep(0.5)
    finally:
        try:
            stop_added(added, cluster.find(profile), drain=True, timeout_s=drain_timeout_s)
        except ClusterError:
            _proc.stop_pids(set(added.pids), groups=added.launcher_pids, grace_s=5.0)
        for s, h in old.items():
            signal.signal(s, h)


def submit(profile: str, add_args: list[str], *, nodes: int = 1, time_limit: str | None = None,
           partition: str | None = None, account: str | None = None, tasks_per_node: int | None = None,
           environ: Mapping[str, str] | None = None) -> str:
    """Write and submit a batch job (Slurm ``sbatch``, else PBS ``qsub``) that runs ``ipmtc add --foreground``
    for ``profile`` on its own nodes; returns its job id. Its output goes to the profile's log/."""
    import shlex
    import shutil
    import sys

    from ._proc import run

    environ = os.environ if environ is None else environ
    pdir = Path(cluster.find(profile, environ).profile_dir)
    ipmtc = [sys.executable, "-m", "ipmtc"]
    cmd = " ".join(shlex.quote(a) for a in [*ipmtc, "add", "--profile", profile, "--foreground", *add_args])
    sbatch = shutil.which("sbatch", path=environ.get("PATH"))
    qsub = shutil.which("qsub", path=environ.get("PATH"))
    if sbatch:
        head = ["#!/bin/bash", "#SBATCH --job-name=ipmtc-add", f"#SBATCH --nodes={nodes}",
                f"#SBATCH --output={pdir}/log/ipmtc-add-%j.out", "#SBATCH --signal=B:TERM@60"]
        head += [f"#SBATCH --time={time_limit}"] * bool(time_limit) + [f"#SBATCH --partition={partition}"] * bool(
            partition) + [f"#SBATCH --account={account}"] * bool(account)
        head += [f"#SBATCH --ntasks-per-node={tasks_per_node}"] * bool(tasks_per_node)
        argv = [sbatch, "--parsable", "--export=ALL"]
    elif qsub:
        res = f"nodes={nodes}" + (f":ppn={tasks_per_node}" if tasks_per_node else "") + (
            f",walltime={time_limit}" if time_limit else "")
        head = ["#!/bin/bash", "#PBS -N ipmtc-add", f"#PBS -l {res}", f"#PBS -o {pdir}/log/", "#PBS -j oe", "#PBS -V"]
        head += [f"#PBS -q {partition}"] * bool(partition) + [f"#PBS -A {account}"] * bool(account)
        argv = [qsub]
    else:
        raise ClusterError("--submit needs sbatch (Slurm) or qsub (PBS) on PATH; run `ipmtc add` inside a job "
                           "of your own instead")
    script = pdir / f"ipmtc-add-{int(time.time())}-{os.getpid()}.sh"
    write_private(script, "\n".join([*head, "# written by ipmtc add --submit: more engines for cluster "
                                             f"{profile}", f"exec {cmd}", ""]))
    cp = run([*argv, str(script)], timeout_s=60, check=False, env=dict(environ))
    if cp.returncode != 0:
        raise ClusterError(f"{Path(argv[0]).name} refused the job: {(cp.stderr or cp.stdout).strip()[:300]}")
    return cp.stdout.strip().split(";")[0]


# ---------------------------------------------------------------- leave


def select(info: cluster.ClusterInfo, alive: list[int], *, engines: int | None = None, ids: list[int] | None = None,
           host: str | None = None, job: str | None = None) -> list[int]:
    """The engines a ``remove`` means: given ids, those on a host (node), of a job, or the last ``engines``."""
    if sum(x is not None for x in (engines, ids, host, job)) != 1:
        raise ClusterError("say which engines leave: one of --engines K, --ids I,J, --host H or --job J")
    if ids is not None:
        unknown = sorted(set(ids) - set(alive))
        if unknown:
            raise ClusterError(f"engines {unknown} are not in the cluster (its engines: {alive[:20]}...); "
                               "`ipmtc status -v` lists them")
        return sorted(ids)
    if engines is not None:
        if engines < 1 or engines > len(alive):
            raise ClusterError(f"--engines {engines}: the cluster has {len(alive)} engines; ask for 1 to {len(alive)}")
        return sorted(alive)[-engines:]  # the newest first to go
    def matches(i: int) -> bool:
        e = info.engines.get(str(i), {})
        if host is not None:
            return host in (e.get("node"), e.get("host"))
        return str(e.get("origin", "")).endswith(f" job {job}")

    out = sorted(i for i in alive if matches(i))
    if not out:
        what = f"runs on host {host!r}" if host is not None else f"came from job {job!r}"
        raise ClusterError(f"no engine of the cluster {what}; `ipmtc status -v` lists engines by node and origin")
    return out


def remove(profile: str | None = None, *, engines: int | None = None, ids: list[int] | None = None,
           host: str | None = None, job: str | None = None, wait: bool = True,
           timeout_s: float = 3600.0) -> list[int]:
    """Drain engines: maps hand them nothing more, each exits after what it holds. Returns their ids."""
    info = cluster.find(profile)
    info.engines.update(cluster.engine_notes(Path(info.profile_dir)))
    client = cluster.connect(info.profile, wait_for_engines=False)
    try:
        alive = list(client.ids)
        targets = select(info, alive, engines=engines, ids=ids, host=host, job=job)
        with cluster.state_lock(info.profile_dir):  # a remove beside this one: neither list is lost
            leaving = (read_leaving(info.profile_dir) & set(alive)) | set(targets)
            write_private(leaving_path(info.profile_dir), json.dumps({"ids": sorted(leaving), "at": time.time()}))
        client[targets].apply_async(_Leave(), LEAVE_QUIET_S)
        if wait:
            deadline = time.monotonic() + timeout_s
            while set(targets) & set(client.ids):
                if time.monotonic() > deadline:
                    raise ClusterError(f"engines {sorted(set(targets) & set(client.ids))} did not leave within "
                                       f"{timeout_s:g} s (still running a long task?); `ipmtc stop` ends them all")
                time.sleep(0.1)
            with cluster.updating(info.profile) as fresh:
                fresh.n_engines = max(0, fresh.n_engines - len(targets))
        return targets
    finally:
        client.close()


def leave(quiet_s: float = LEAVE_QUIET_S) -> int:
    """Runs on an engine: exit (status 0) between two messages, once no chunk came for ``quiet_s``."""
    from tornado.ioloop import PeriodicCallback

    from .maps import listener

    _, engine_id, loop = _ipp.kernel_parts(_ipp.engine_kernel())
    asked = time.monotonic()

    def check() -> None:
        last = max([asked] + [getattr(li, "last_chunk", 0.0) for li in list(listener._LISTENERS.values())])
        if time.monotonic() - last >= quiet_s:
            for li in list(listener._LISTENERS.values()):
                li.close(bye=False)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(0)  # a clean exit: its node's forker does not restart it

    global _WATCH
    _WATCH = PeriodicCallback(check, 100)
    _WATCH.start()
    return engine_id


_WATCH: Any = None


class _Leave:
    """:func:`leave` pickled by reference (a few bytes)."""

    def __call__(self, *args: Any) -> int:
        return leave(*args)

    def __reduce__(self) -> tuple[type, tuple]:
        return (_Leave, ())
