"""Start, stop, inspect and connect to an ipmtc cluster.

Processes are started by ipyparallel's own ``Cluster`` and launchers (the
controller and every engine launcher get their own session, so they outlive
the CLI). ipmtc adds: readiness with a deadline and the children's liveness,
log tails on failure with nothing left running, and a state file in the
profile's ``security/`` folder that lets ``stop``/``status``/``connect`` find
the cluster again. Stopping is by PID and process group (TERM -> wait -> KILL).
"""
from __future__ import annotations

import contextlib
import errno
import getpass
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import _ipp, _proc, allocation, notes, presets, resources
from ._private import PRIVATE_UMASK, write_private
from .errors import ClusterError, ClusterRunningError, LauncherNotFoundError, NoClusterError, StartupError
from .launch import EnginePlan, asks_gpus, engine_cmd, plan_engines
from .profile import default_name, ipython_dir, profile_dir, write_profile

STATE_FILE = "ipmtc-cluster.json"
STATE_LOCK = "ipmtc-state.lock"
STATE_LOCK_WAIT_S = 30.0
ADD_TAG_ENV = "IPMTC_ADD_TAG"  # which `ipmtc add` started an engine (its note says so)
HUB_RECHECK_S = 2.0  # start-up: how often the hub's own engine count is compared with the client's
LOG_TAIL_LINES = 15


@dataclass
class ClusterInfo:
    """What ``ipmtc start`` records about a running cluster (the state file)."""

    profile: str
    profile_dir: str
    n_engines: int
    launcher: str
    allocation: str
    job_id: str | None
    hosts: list[str]
    controller_pid: int
    launcher_pids: list[int]  # session leaders: controller, engine launchers (process groups)
    pids: list[int] = field(default_factory=list)  # every process of the cluster seen at start
    started_at: float = 0.0
    startup_s: float = 0.0
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> host, pid, node
    pid_times: dict[str, float] = field(default_factory=dict)  # pid -> start time (PID reuse guard)
    user: str = ""
    hostname: str = ""
    preset: str = ""
    added: list[dict[str, Any]] = field(default_factory=list)  # engines `ipmtc add` started: origin, host, pids

    @property
    def state_path(self) -> Path:
        return Path(self.profile_dir) / "security" / STATE_FILE

    def save(self) -> None:
        write_private(self.state_path, json.dumps(asdict(self), indent=1))

    @property
    def running(self) -> bool:
        """Whether the controller runs: its process, on its own host; seen from another host (an ``ipmtc add`` in
        another job's node), whether its connection file is still there (``stop`` removes it)."""
        if self.hostname and self.hostname != socket.gethostname():
            return (self.state_path.parent / "ipcontroller-client.json").exists()
        return _proc.alive(self.controller_pid)

    def attach_hint(self) -> str:
        return (f"attach: ipmtc.connect(profile={self.profile!r})  or  "
                f"ipyparallel.Client(profile={self.profile!r})")


@contextlib.contextmanager
def state_lock(pdir: str | os.PathLike) -> Iterator[None]:
    """Hold the profile's state lock: read-modify-writes of the state and leaving files by several ipmtc
    processes at once (``ipmtc add`` from two jobs, a ``remove`` beside them) must not lose each other's
    changes. A POSIX record lock (``lockf``), which NFS and Lustre carry across nodes."""
    import fcntl

    fd = os.open(Path(pdir) / "security" / STATE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + STATE_LOCK_WAIT_S
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):  # no locks on this file system at all: go on
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"another ipmtc process has held {Path(pdir) / 'security' / STATE_LOCK} for "
                                       f"{STATE_LOCK_WAIT_S:g} s; try again (or remove it if none runs)") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # (releases the lock)


@contextlib.contextmanager
def updating(profile: str) -> Iterator[ClusterInfo]:
    """The cluster's state, fresh from its file under the state lock, saved when the block ends normally."""
    pdir = profile_dir(profile)
    with state_lock(pdir):
        info = find(profile)
        yield info
        info.save()


# ---------------------------------------------------------------- finding clusters


def _load_state(pdir: Path) -> ClusterInfo | None:
    path = pdir / "security" / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return ClusterInfo(**data)
    except (ValueError, TypeError) as e:
        raise ClusterError(f"cluster state file {path} is damaged ({type(e).__name__}); "
                           f"run `ipmtc stop --profile {pdir.name.removeprefix('profile_')} --force` "
                           "to clean up") from None


def find(profile: str | None = None, environ: Mapping[str, str] | None = None) -> ClusterInfo:
    """The cluster of ``profile`` (default: ``$IPMTC_PROFILE``, this job's, or the only one running)."""
    environ = os.environ if environ is None else environ
    name = profile or environ.get("IPMTC_PROFILE")
    if name is None:
        alloc = allocation.detect(environ)
        name = default_name(alloc)
        if _load_state(profile_dir(name)) is None:
            running = [c for c in list_clusters() if c.running]
            if len(running) == 1:
                return running[0]
            if len(running) > 1:
                names = ", ".join(c.profile for c in running)
                raise NoClusterError(f"several ipmtc clusters are running ({names}); "
                                     "pick one with profile=... / --profile")
    info = _load_state(profile_dir(name))
    if info is None:
        raise NoClusterError(f"no ipmtc cluster under profile {name!r} (in {ipython_dir()}); "
                             "start one with `ipmtc start` (or `ipmtc start --engines N` outside a batch job)")
    return info


def list_clusters() -> list[ClusterInfo]:
    """Every ipmtc cluster recorded in this user's IPython directory (running or not)."""
    out = []
    for path in sorted(ipython_dir().glob(f"profile_*/security/{STATE_FILE}")):
        try:
            info = _load_state(path.parent.parent)
        except ClusterError:
            continue
        if info is not None:
            out.append(info)
    return out


def connect(profile: str | None = None, *, timeout_s: float = 10.0, wait_for_engines: bool = True):
    """A connected ``ipyparallel.Client`` for the current job's cluster (or ``profile``'s)."""
    import ipyparallel as ipp

    info = find(profile)
    if not info.running:
        raise NoClusterError(f"the cluster under profile {info.profile!r} is not running (controller "
                             f"pid {info.controller_pid} is gone); `ipmtc stop --profile {info.profile}` "
                             "cleans up, then `ipmtc start`")
    try:
        client = ipp.Client(profile_dir=info.profile_dir, cluster_id="", timeout=timeout_s)
    except Exception as e:  # damaged/missing connection file, unreachable controller
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"cannot connect to the cluster under profile {info.profile!r}: "
                           f"{type(e).__name__}: {first}; check `ipmtc status` or restart it") from None
    if wait_for_engines and info.n_engines:
        try:
            client.wait_for_engines(1, timeout=timeout_s)
        except TimeoutError:
            client.close()
            raise ClusterError(f"the cluster under profile {info.profile!r} has no engines; "
                               "restart it with `ipmtc stop` and `ipmtc start`") from None
    return client


# ---------------------------------------------------------------- start


def _engine_info() -> dict[str, Any]:
    """Run on each engine once: where it is (fake Slurm nodes share a hostname), its pool, cores, GPUs."""
    import os
    import socket

    from ipmtc.resources import engine_resources

    try:  # its batch job's end, as the launching `ipmtc start`/`add` found it (maps drain the engine before it)
        ends_at: float | None = float(os.environ.get(allocation.END_TIME_ENV, ""))
    except ValueError:
        ends_at = None
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            "rank": os.environ.get("PMI_RANK") or os.environ.get("SLURM_PROCID"),
            "origin": os.environ.get("IPMTC_ORIGIN", "start"), "ends_at": ends_at,
            "tag": os.environ.get(ADD_TAG_ENV, ""), **engine_resources()}


def _tail(path: str | os.PathLike, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


def _log_tails(pdir: Path) -> str:
    """Last lines of the controller, engine and mpiexec/srun logs, newest files first."""
    logs = sorted((pdir / "log").glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    parts = []
    for path in logs[:4]:
        text = _tail(path)
        if text:
            parts.append(f"  --- {path}\n{text}")
    return "\n".join(parts) or "  (no log output)"


def _live_engine_processes(cluster) -> tuple[int, int]:
    """(engine launcher processes alive, launcher processes started)."""
    pids = _ipp.launcher_pids(cluster)[1:]
    return sum(_proc.alive(p) for p in pids), len(pids)


@dataclass(frozen=True)
class Setup:
    """What a start (or ``ipmtc profile create``) will do: resolved preset, allocation, engine plan, profile."""

    resolved: presets.Resolved
    alloc: allocation.Allocation
    plan: EnginePlan
    name: str
    ends_at: float | None = None  # the batch job's end (engines note it; maps drain them before it)


def resolve_setup(*, preset: str | None = None, flags: Mapping[str, Any] | None = None, nodes: int | None = None,
                  engines: int | None = None, profile: str | None = None,
                  environ: Mapping[str, str] | None = None) -> Setup:
    """The one resolve step: flags > ``IPMTC_*`` > preset file > built-in preset, then the allocation and plan."""
    environ = os.environ if environ is None else environ
    resolved = presets.resolve(preset, flags, environ)
    alloc = allocation.detect(environ)
    gpus = len(resources.node_gpus(environ).ids) if asks_gpus(resolved.preset) else 0
    plan = plan_engines(resolved.preset, alloc, nodes=nodes, engines=engines, gpus_per_node=gpus)
    resolved = presets.concretize(resolved, plan.n_engines)
    name = profile or environ.get("IPMTC_PROFILE") or default_name(alloc)
    return Setup(resolved, alloc, plan, name, allocation.job_end_time(environ))


def create_profile(*, preset: str | None = None, flags: Mapping[str, Any] | None = None,
                   engines: int | None = None, profile: str | None = None,
                   environ: Mapping[str, str] | None = None) -> Path:
    """Write the profile a start would write (``ipmtc profile create``), without starting anything."""
    setup = resolve_setup(preset=preset, flags=flags, engines=engines, profile=profile, environ=environ)
    return write_profile(setup.resolved, setup.plan, setup.alloc, setup.name)


def start(*, preset: str | None = None, flags: Mapping[str, Any] | None = None, nodes: int | None = None,
          engines: int | None = None, profile: str | None = None, environ: Mapping[str, str] | None = None,
          on_progress: Callable[[int, int], None] | None = None) -> ClusterInfo:
    """Start a controller here and the engines across the allocation; wait until all registered.

    Returns once every engine has registered, leaving the cluster running in the
    background. On failure raises :class:`StartupError` with log tails, and
    nothing it started is left running.
    """
    t0 = time.monotonic()
    setup = resolve_setup(preset=preset, flags=flags, nodes=nodes, engines=engines, profile=profile,
                          environ=environ)
    pdir = profile_dir(setup.name)
    _refuse_running_or_clean_stale(pdir, setup.name)
    _check_mpi4py(setup.plan)
    for attempt in range(PORT_RACE_TRIES):
        try:
            return _start_once(setup, pdir, t0, on_progress)
        except _PortRace:
            # ipyparallel picks free ports, closes them, then binds: another process can take one between
            # (seen with clusters starting side by side); its task scheduler then dies at once. Start again.
            if attempt == PORT_RACE_TRIES - 1:
                raise StartupError(f"the controller's task scheduler could not bind its port {PORT_RACE_TRIES} "
                                   "times (ports taken by other processes as it started); nothing was left "
                                   "running; try again, or set controller_ports to a free range") from None
    raise AssertionError("unreachable")


class _PortRace(Exception):
    """The controller lost a port to another process while starting (its task scheduler died)."""


PORT_RACE_TRIES = 3
SCHEDULER_CHECK_S = 15.0  # a test task through the task scheduler, once every engine registered


def _port_race(pdir: Path) -> bool:
    """Whether the controller's log says one of its processes could not bind its port."""
    for log in (pdir / "log").glob("ipcontroller-*.log"):
        try:
            if "Address already in use" in log.read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def _scheduler_answers(client: Any) -> bool:
    """A no-op through the load-balanced scheduler (a separate process in ipyparallel) comes back."""
    try:
        client.load_balanced_view().apply_async(int).get(timeout=SCHEDULER_CHECK_S)
        return True
    except Exception:
        return False


def _start_once(setup: Setup, pdir: Path, t0: float, on_progress: Callable[[int, int], None] | None) -> ClusterInfo:
    _write_fresh_profile(setup, pdir)

    import ipyparallel as ipp

    cluster = ipp.Cluster(profile_dir=str(pdir), cluster_id="", shutdown_atexit=False,
                          log_level=30 if setup.resolved.preset.log_level != "DEBUG" else 10)
    timeout_s = float(setup.resolved.preset.start_timeout_s)
    deadline = time.monotonic() + timeout_s
    client = None
    try:
        _start_processes(cluster, setup.plan, int(setup.resolved.preset.engine_restarts), setup.ends_at)
        client = cluster.connect_client_sync()
        client = _wait_for_registration(cluster, client, setup.plan, deadline, timeout_s, on_progress)
        if not _scheduler_answers(client):
            raise StartupError(f"the controller's task scheduler did not answer a test task within "
                               f"{SCHEDULER_CHECK_S:g} s")
        startup_s = time.monotonic() - t0
        return _record_cluster(cluster, client, setup, pdir, startup_s, timeout_s)
    except BaseException as e:
        tails = _stop_failed_start(cluster, pdir)
        if isinstance(e, StartupError) and _port_race(pdir):
            raise _PortRace() from None
        if isinstance(e, StartupError):
            hint = ("hint: raise --timeout-s, check that engines can reach the controller at "
                    f"{setup.plan.controller_location} (preset controller_ip/controller_location), "
                    "or use --preset debug for verbose logs")
            raise StartupError(f"{e}; nothing was left running\n{tails}\n{hint}") from None
        if isinstance(e, (KeyboardInterrupt, ClusterError)):
            raise
        raise StartupError(f"start-up failed: {type(e).__name__}: {e}; nothing was left running\n{tails}") from e
    finally:
        if client is not None:
            client.close()


def _refuse_running_or_clean_stale(pdir: Path, name: str) -> None:
    """Refuse to start over a running cluster of this profile; clean up after one that died."""
    old = _load_state(pdir) if pdir.exists() else None
    if old is not None:
        if old.running:
            raise ClusterRunningError(f"a cluster is already running under profile {name!r} "
                                      f"({old.n_engines} engines, pid {old.controller_pid}); "
                                      f"`ipmtc stop --profile {name}` first or pick another --profile")
        _cleanup(old)  # stale state of a cluster that died: its leftovers go now


def _check_mpi4py(plan: EnginePlan) -> None:
    """MPI launchers need mpi4py: say so before anything starts."""
    if plan.launcher != "local":
        try:
            import mpi4py  # noqa: F401  (engines started with --mpi import it)
        except ImportError:
            raise LauncherNotFoundError(f"launcher {plan.launcher!r} starts MPI engines, which need mpi4py; "
                                        "pip install 'ipmtc[mpi]'") from None


def _write_fresh_profile(setup: Setup, pdir: Path) -> None:
    """Write the profile and remove what an earlier start left in it (logs, connection files)."""
    write_profile(setup.resolved, setup.plan, setup.alloc, setup.name)
    for old_log in (pdir / "log").glob("*.log"):  # tails shown on failure must be this start's
        old_log.unlink(missing_ok=True)
    for stale in ("ipcontroller-client.json", "ipcontroller-engine.json"):
        (pdir / "security" / stale).unlink(missing_ok=True)


def _start_processes(cluster, plan: EnginePlan, restarts: int = 3, ends_at: float | None = None) -> None:
    """Start the controller, then the engines with the plan's launcher (each in its own session).

    Under a 077 umask: the log files ipyparallel's launchers open here, and whatever the processes
    create, are private (the processes set it themselves too).
    """
    old = os.umask(PRIVATE_UMASK)
    try:
        _start(cluster, plan, restarts, ends_at)
    finally:
        os.umask(old)


def _start(cluster, plan: EnginePlan, restarts: int, ends_at: float | None) -> None:
    cluster.start_controller_sync()
    start_engine_sets(cluster, plan, restarts, machinefile=Path(cluster.profile_dir) / "machinefile", ends_at=ends_at)


def start_engine_sets(cluster, plan: EnginePlan, restarts: int, *, machinefile: Path,
                      extra_env: Mapping[str, str] | None = None, mpi_cmd: tuple[str, ...] = (),
                      ends_at: float | None = None) -> None:
    """Start the plan's engines, pool by pool, through ``cluster``'s launchers (``ipmtc start`` and ``ipmtc add``).

    ``mpi_cmd``: the launcher program where it differs from the profile's (an ``ipmtc add`` elsewhere);
    ``ends_at``: the batch job's end, which each engine notes (maps hand it nothing it could not finish).
    """
    # srun starts each engine itself: engines need no MPI wiring, so they skip MPI_Init
    # (ipmtc.engine drops --mpi) and srun sets up no PMI. Measured with the mpich wheel under
    # Slurm's pmi2 plugin: MPI_Init now and then hung ("mpi/pmi2: value not properly
    # terminated") and every killed singleton left a /dev/shm segment behind.
    engine_env = {"SLURM_MPI_TYPE": "none", "IPMTC_ENGINE_MPI": "0"} if plan.launcher == "srun" else {}
    extra: dict[str, Any] = {"mpi_cmd": list(mpi_cmd)} if mpi_cmd and plan.launcher != "local" else {}
    for pool in plan.pools:  # each pool: one launch, its layout in the engines' environment
        env = {**engine_env, **(extra_env or {}), resources.BIND_ENV: pool.env(),
               "IPMTC_ENGINE_RESTART_LIMIT": str(restarts),
               allocation.END_TIME_ENV: "none" if ends_at is None else f"{ends_at:.0f}"}
        if plan.launcher == "local":
            # one process imports ipyparallel once and forks the N engines: N fresh Pythons each
            # importing it were most of the start-up (measured: 6.6 s -> 4.5 s for 8 engines, 2 cores)
            cluster.start_engines_sync(n=1, engine_cmd=engine_cmd(copies=plan.pool_engines(pool)), environment=env)
        elif plan.per_node:  # one process per node imports ipyparallel once and forks the node's engines
            args = plan.pool_args(pool) + (("-machinefile", str(machinefile)) if plan.machinefile_lines else ())
            cluster.start_engines_sync(n=len(plan.hosts), environment=env, mpi_args=list(args),
                                       engine_cmd=engine_cmd(copies=pool.engines_per_node), **extra)
        elif len(plan.pools) == 1 and not extra:  # the profile's arguments (what `ipcluster engines` would use)
            cluster.start_engines_sync(n=plan.n_engines, environment=env)
        else:
            args = plan.pool_args(pool) + (("-machinefile", str(machinefile)) if plan.machinefile_lines else ())
            cluster.start_engines_sync(n=plan.pool_engines(pool), environment=env, mpi_args=list(args), **extra)


def _wait_for_registration(cluster, client, plan: EnginePlan, deadline: float, timeout_s: float,
                           on_progress: Callable[[int, int], None] | None) -> Any:
    """Poll until every engine registered; :class:`StartupError` once the controller or every launcher
    process is gone, or at the deadline. Returns the client (a new one if the first missed registrations)."""
    last = -1
    asked_hub = time.monotonic()
    while True:
        registered = len(client.ids)
        if registered != last and on_progress:
            on_progress(registered, plan.n_engines)
        last = registered
        if registered >= plan.n_engines:
            return client
        if not _proc.alive(cluster.controller.pid):
            raise StartupError(f"the controller exited during start-up ({registered}/{plan.n_engines} "
                               f"engines registered)")
        live, started = _live_engine_processes(cluster)
        if live == 0:  # every launcher process (mpiexec, srun, the local forker) ended
            raise StartupError(f"engine processes exited during start-up ({registered}/{plan.n_engines} "
                               f"registered, {live}/{started} {plan.launcher} processes alive)")
        if time.monotonic() > deadline:
            raise StartupError(f"only {registered}/{plan.n_engines} engines registered within "
                               f"{timeout_s:g} s")
        if time.monotonic() - asked_hub > HUB_RECHECK_S:
            # a client connected while engines registered can miss their notifications (PUB/SUB's
            # slow joiner) and never learn of them: ask the hub, and connect afresh if it knows more
            asked_hub = time.monotonic()
            if sum(isinstance(k, int) for k in client.queue_status()) > registered:
                client.close()
                client = cluster.connect_client_sync()
                continue
        time.sleep(0.1)


def _record_cluster(cluster, client, setup: Setup, pdir: Path, startup_s: float, timeout_s: float) -> ClusterInfo:
    """Ask each engine where it runs, note every process of the cluster, and save the state file."""
    plan = setup.plan
    engines_info = client[:].apply_async(_engine_info).get(timeout=max(10.0, timeout_s / 4))
    launcher_pids = _ipp.launcher_pids(cluster)
    all_pids = sorted({p for lp in launcher_pids for p in _proc.process_tree(lp)})
    info = ClusterInfo(
        profile=setup.name, profile_dir=str(pdir), n_engines=plan.n_engines, launcher=plan.launcher,
        allocation=setup.alloc.describe(), job_id=setup.alloc.job_id, hosts=list(plan.hosts),
        controller_pid=cluster.controller.pid, launcher_pids=launcher_pids,
        pids=all_pids, pid_times={str(p): t for p in all_pids if (t := _proc.start_time(p))},
        started_at=time.time() - startup_s, startup_s=round(startup_s, 3),
        engines={str(eid): e for eid, e in zip(client.ids, engines_info)},
        user=getpass.getuser(), hostname=socket.gethostname(), preset=setup.resolved.name)
    info.save()
    # ipyparallel writes its cluster file world-readable; every file in security/ is 0600
    for f in (pdir / "security").glob("*.json"):
        os.chmod(f, 0o600)
    return info


def _stop_failed_start(cluster, pdir: Path) -> str:
    """Stop every process a failed start left and remove its files; returns the logs' tails, read first."""
    tails = _log_tails(pdir)
    pids = _ipp.launcher_pids(cluster)
    tree = {p for lp in pids for p in _proc.process_tree(lp)}
    _proc.stop_pids(tree, groups=pids, grace_s=3.0)
    _remove_files(pdir)
    return tails


# ---------------------------------------------------------------- stop / status


def _remove_files(pdir: Path) -> None:
    sec = pdir / "security"
    for f in (STATE_FILE, "ipcontroller-client.json", "ipcontroller-engine.json", "cluster-.json",
              notes.LEAVING_FILE, STATE_LOCK):
        (sec / f).unlink(missing_ok=True)
    for note in notes.notes_dir(pdir).glob("*.json*"):  # the engines' notes about themselves
        note.unlink(missing_ok=True)


def _same_process(info: ClusterInfo, pid: int) -> bool:
    """False if ``pid`` now belongs to another process than the one recorded at start (PID reuse)."""
    then = info.pid_times.get(str(pid))
    now = _proc.start_time(pid)
    return then is None or now is None or abs(now - then) < 0.5


def _cleanup(info: ClusterInfo) -> int:
    pdir = Path(info.profile_dir)
    here = socket.gethostname()
    elsewhere = [i for a in info.added if a.get("host") != here for i in a.get("ids", [])]
    if elsewhere and info.running:  # engines added from another host: asked to shut down (their PIDs are not ours)
        try:
            client = connect(info.profile, timeout_s=5.0, wait_for_engines=False)
            try:
                client.shutdown(targets=[i for i in elsewhere if i in client.ids], block=False)
            finally:
                client.close()
        except Exception:
            pass
    for a in info.added:  # engines added from this host: stopped like the rest
        if a.get("host") == here:
            info.launcher_pids = info.launcher_pids + list(a.get("launcher_pids", []))
            info.pids = info.pids + list(a.get("pids", []))
            info.pid_times.update(a.get("pid_times", {}))
    groups = {g for g in set(info.launcher_pids) | set(_ipp.cluster_file_pids(pdir)) if _same_process(info, g)}
    # now-current descendants too: nannies and MPI proxies live in other sessions
    pids = {p for p in info.pids if _same_process(info, p)} | {p for g in groups for p in _proc.process_tree(g)}
    ours = {p for p in pids | groups if _proc.alive(p)}
    left = _proc.stop_pids(pids, groups=groups, grace_s=5.0)
    _remove_files(pdir)
    if left:
        raise ClusterError(f"processes {left} of profile {info.profile!r} survived SIGKILL; check them by hand")
    return len(ours)


def stop(profile: str | None = None) -> tuple[ClusterInfo, int]:
    """Stop the cluster (TERM -> wait -> KILL by process group); returns (info, processes stopped)."""
    info = find(profile)
    return info, _cleanup(info)


def force_clean(profile: str) -> None:
    """Remove a damaged state file's profile leftovers (ipyparallel's own record of PIDs is still used)."""
    pdir = profile_dir(profile)
    groups = _ipp.cluster_file_pids(pdir)
    _proc.stop_pids({p for g in groups for p in _proc.process_tree(g)}, groups=groups)
    _remove_files(pdir)


def status(profile: str | None = None, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Engines per host, tasks queued/running/done, uptime. No keys or secrets."""
    info = find(profile)
    out: dict[str, Any] = {"profile": info.profile, "running": info.running,
                           "uptime_s": round(time.time() - info.started_at, 1),
                           "expected_engines": info.n_engines, "launcher": info.launcher,
                           "allocation": info.allocation, "startup_s": info.startup_s,
                           "controller": f"{info.hostname} pid {info.controller_pid}"}
    if not info.running:
        return out
    client = connect(info.profile, timeout_s=timeout_s, wait_for_engines=False)
    try:
        ids = list(client.ids)
        queues = client.queue_status()
        info.engines.update({k: v for k, v in engine_notes(Path(info.profile_dir)).items() if k not in info.engines})
        missing = [i for i in ids if str(i) not in info.engines]
        if missing:  # engines that joined after start and noted nothing (yet): ask them, briefly
            try:
                got = client[missing].apply_async(_engine_info).get(timeout=2.0)
                info.engines.update({str(i): g for i, g in zip(missing, got)})
                with updating(info.profile) as fresh:
                    fresh.engines.update({str(i): g for i, g in zip(missing, got)})
            except Exception:  # busy engines do not answer now; shown as unknown
                pass
        per_host: dict[str, int] = {}
        pools: dict[str, dict[str, int]] = {}
        origins: dict[str, int] = {}
        rows = []
        for i in ids:
            e = info.engines.get(str(i), {})
            node = e.get("node", "unknown (busy)")
            per_host[node] = per_host.get(node, 0) + 1
            pool = e.get("pool", "?")
            q = queues.get(i, {})
            p = pools.setdefault(pool, {"engines": 0, "tasks_running": 0, "tasks_done": 0, "gpus": 0,
                                        "cores_per_engine": 1})
            p["engines"] += 1
            p["tasks_running"] += q.get("tasks", 0)
            p["tasks_done"] += q.get("completed", 0)
            p["gpus"] += len([g for g in str(e.get("gpus", "")).split(",") if g])
            n_cores = len([c for c in str(e.get("cores", "")).split(",") if c])
            p["cores_per_engine"] = max(p["cores_per_engine"], n_cores)
            origin = str(e.get("origin", "start"))
            origins[origin] = origins.get(origin, 0) + 1
            rows.append({"id": i, "pool": pool, "node": node, "cores": str(e.get("cores", "")),
                         "cpus": str(e.get("cpus", "")), "gpus": str(e.get("gpus", "")), "origin": origin})
        running = sum(q.get("tasks", 0) for k, q in queues.items() if isinstance(k, int))
        queued = sum(q.get("queue", 0) for k, q in queues.items() if isinstance(k, int))
        done = sum(q.get("completed", 0) for k, q in queues.items() if isinstance(k, int))
        restarts, given_up = _restarts(Path(info.profile_dir))
        out.update(restarts=restarts, given_up=given_up)
        out.update(engines=len(ids), engines_per_host=dict(sorted(per_host.items())),
                   tasks_running=running, tasks_queued=queued + queues.get("unassigned", 0),
                   tasks_done=done, pools=dict(sorted(pools.items())), engine_rows=rows, origins=origins)
    finally:
        client.close()
    return out


def engine_notes(pdir: Path) -> dict[str, dict[str, Any]]:
    """What each engine noted about itself once registered (``security/engines/<id>.json``): id -> info."""
    return notes.read_notes(pdir)


def _restarts(pdir: Path) -> tuple[int, list[str]]:
    """(engines restarted by their nodes' forkers, nodes given up) from the forkers' notes in log/."""
    total, given_up = 0, []
    for note in sorted((pdir / "log").glob("ipmtc-restarts-*.json")):
        try:
            data = json.loads(note.read_text())
        except (OSError, ValueError):
            continue
        total += int(data.get("restarts", 0))
        if data.get("given_up"):
            given_up.append(str(data.get("node", "?")))
    return total, given_up


def wait_foreground(info: ClusterInfo) -> None:
    """Block until SIGINT/SIGTERM or the controller exits, then stop the cluster."""
    stop_now = False

    def _handler(signum, frame):
        nonlocal stop_now
        stop_now = True

    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop_now and info.running:
            time.sleep(0.5)
    finally:
        _cleanup(info)  # before the old handlers come back: a second signal must not cut it short
        for s, h in old.items():
            signal.signal(s, h)


def stop_cluster(info: ClusterInfo) -> int:
    """Stop the cluster ``info`` describes (all its processes); how many were stopped."""
    return _cleanup(info)

