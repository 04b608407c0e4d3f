"""Engine entry point for MPI-launched engines: ``python -m ipmtc.engine --mpi ...``.

It runs ipyparallel's own engine unchanged, after three things that keep one
rank's death from taking the other ranks down (measured here with the mpich 5
wheel and ``mpiexec -disable-auto-cleanup``; without them, SIGKILL of one engine
ended all the others within 0.2 s, or at their next task):

- hydra's proxy SIGKILLs every rank on its node when one of its children dies
  *by a signal* (whatever ``-disable-auto-cleanup`` says; it is a race with the
  proxy's ``waitpid``, so it happened in about a third of the runs): the engine
  runs in a forked child and this small parent, the process hydra sees, always
  ends with a plain exit status (128 + signal number), never by a signal;
- hydra notifies the surviving ranks with SIGUSR1, whose default action
  terminates the process: ignore it;
- hydra stops forwarding the ranks' stdout/stderr, so the next log line kills
  the engine: write each engine's output to its own file in the profile's log/.

Under srun (``IPMTC_ENGINE_MPI=0``) the engine is started without ``--mpi`` and
without the parent: srun places and supervises each engine, which needs no MPI.

Local engines (``--copies N``): ipyparallel's local launcher starts this module
once; it imports ipyparallel's engine once and forks the N engines, then waits
for them like mpiexec would (forwarding TERM/INT/HUP; one engine's death leaves
the others running). Measured with 8 engines on 2 cores: N fresh Pythons each
importing ipyparallel (~0.5 s of CPU apiece) were most of the start-up. Only
ipyparallel is imported before the fork: Python re-seeds ``random`` in each
child, and numpy or the user's modules are first imported by each engine.

Every engine (local, MPI, srun) also gets its nanny -- ipyparallel's per-engine
helper that relays signals and reports the engine's death at once -- from a
fork made before the engine starts, instead of a fresh ``python -m
ipyparallel.engine.nanny`` that imports ipyparallel again. Measured with 8 local
engines on 2 cores: the fresh nannies took 1.9 s of the start-up.
"""
import os
import pickle
import signal
import sys

from . import _ipp

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _own_log(label: str) -> None:
    log_dir = os.path.join(os.environ.get("IPP_PROFILE_DIR") or ".", "log")
    node = os.environ.get("SLURMD_NODENAME", "")
    name = f"ipengine-{label}{'-' + node if node else ''}-{os.getpid()}.log"
    try:
        os.makedirs(log_dir, exist_ok=True)
        fd = os.open(os.path.join(log_dir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        return  # keep the inherited streams rather than fail to start
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class _NannyFork:
    """A process forked before the engine has threads, sockets or a loop; it becomes the nanny.

    ipyparallel's ``start_nanny`` pickles the nanny's arguments to a fresh Python's
    stdin and reads its control URL from its stdout; this does the same over two
    pipes, so the engine's code path is unchanged. If the engine never asks (nanny
    disabled) or dies first, the fork reads EOF and exits.
    """

    def __init__(self) -> None:
        from ipyparallel.engine import nanny  # noqa: F401 (imported once, here, for both processes)

        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        if os.fork() == 0:  # the waiting nanny
            os.close(self._cmd_w)
            os.close(self._out_r)
            self._serve(cmd_r, out_w)
        os.close(cmd_r)
        os.close(out_w)
        self._handle = None

    @staticmethod
    def _serve(cmd_r: int, out_w: int) -> None:
        code = 0
        try:
            os.setsid()  # like ipyparallel's Popen(start_new_session=True): signals to the engine's group pass by
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            lo, hi = sorted((cmd_r, out_w))  # no PMI socket or other inherited descriptor stays open
            os.closerange(3, lo)
            os.closerange(lo + 1, hi)
            os.closerange(hi + 1, 65536)
            with os.fdopen(cmd_r, "rb") as f:
                data = f.read()
            if data:
                kwargs = pickle.loads(data)
                kwargs["pipe"] = os.fdopen(out_w, "w", buffering=1)
                _ipp.nanny_main(**kwargs)
        except BaseException:
            code = 1
        finally:
            os._exit(code)

    def start_nanny(self, **kwargs):
        """Drop-in for ``ipyparallel.engine.nanny.start_nanny``: (nanny URL, handle to keep)."""
        kwargs["pid"] = os.getpid()
        with os.fdopen(self._cmd_w, "wb") as f:
            f.write(pickle.dumps(kwargs))
        self._handle = os.fdopen(self._out_r, "r")  # the nanny exits when this end closes
        url = self._handle.readline().strip()
        if not url:
            raise RuntimeError("nanny failed")
        return url, self._handle


def _wait_all(children: dict[int, int], restart_limit: int | None = None) -> int:
    """Forward TERM/INT/HUP to the children (pid -> copy number), reap them, and exit with a plain status.

    A child that dies by a signal while nothing is being stopped is forked again with the same number,
    up to ``restart_limit`` times in all (None: an MPI rank's supervisor, which restarts nothing): that number
    is returned in the new child (never in this parent).
    Past the limit the node is given up (the others keep running). A child that exits by itself (removed,
    controller gone) is not restarted. Each restart is noted for ``ipmtc status`` (:func:`_note_restarts`).
    """
    parent = os.getpid()
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    restarts = 0
    code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        copy = children.pop(pid, None)
        if copy is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code >= 0 or stopping or restart_limit is None:
            continue
        if restarts >= restart_limit:
            _note_restarts(restarts, given_up=True, last_signal=-code)
            continue
        restarts += 1
        _note_restarts(restarts, given_up=False, last_signal=-code)
        child = os.fork()
        if child == 0:
            _die_with(parent)
            for sig in _FORWARDED:
                signal.signal(sig, signal.SIG_DFL)
            os.environ["IPMTC_ENGINE_RESTARTS"] = str(restarts)
            return copy
        children[child] = copy
    os._exit(128 - code if code < 0 else code)


def _supervise() -> None:
    """Fork; the child returns and becomes the engine, this parent waits and exits normally."""
    child = os.fork()
    if child == 0:
        return
    # The PMI socket belongs to the engine: hydra must see it close when the engine dies.
    try:
        os.close(int(os.environ["PMI_FD"]))
    except (KeyError, ValueError, OSError):
        pass
    _wait_all({child: 0})


def _fork_copies(n: int, restart_limit: int = 0) -> int:
    """Fork ``n`` engines and supervise them (:func:`_wait_all`, which restarts one that died by a signal);
    returns the copy number in each engine, never in this parent."""
    children: dict[int, int] = {}
    parent = os.getpid()
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            _die_with(parent)
            return i
        children[pid] = i
    return _wait_all(children, restart_limit)


def _die_with(parent: int) -> None:
    """This forked engine is SIGKILLed when its forker dies (measured: srun's SIGTERM has slurmstepd SIGKILL a
    step's tasks, and an engine whose forker went first was left running, reparented, outside the step)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the forker died before the prctl took effect
        os._exit(1)


def _note_restarts(restarts: int, *, given_up: bool, last_signal: int) -> None:
    """What this node's forker restarted, for ``ipmtc status`` (a small private file in the profile's log/)."""
    import json
    import socket

    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    log_dir = os.path.join(os.environ.get("IPP_PROFILE_DIR") or ".", "log")
    try:  # the pool's layout names it
        pool = str(json.loads(os.environ.get("IPMTC_ENGINE_BIND") or "{}").get("name", ""))
    except (ValueError, AttributeError):
        pool = ""
    path = os.path.join(log_dir, f"ipmtc-restarts-{node}-{os.getpid()}.json")
    try:
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"node": node, "pool": pool, "restarts": restarts, "given_up": given_up,
                       "last_signal": last_signal}, f)
        os.replace(tmp, path)
    except OSError:
        pass
    if given_up:
        print(f"ipmtc.engine: node {node}: an engine died (signal {last_signal}) after {restarts} restarts "
              "here; not restarted again", file=sys.stderr, flush=True)


def _pop_copies(argv: list[str]) -> int:
    if "--copies" not in argv:
        return 0
    at = argv.index("--copies")
    n = int(argv[at + 1])
    del argv[at:at + 2]
    return n


def _private() -> None:
    """What the engine writes is private, and its logs never show the cluster's key (ipyparallel's engine
    logs its whole configuration at DEBUG)."""
    os.umask(0o077)
    try:
        import json

        key = json.loads(os.environ.get("IPP_CONNECTION_INFO") or "{}").get("key") or ""
    except ValueError:
        key = ""
    from ._private import redact_in_logs

    redact_in_logs([key])


PUBLISH_WITHIN_S = 600.0


def _publish_when_registered() -> None:
    """Once registered, this engine notes its id, node, pool, cores, GPUs and origin in the profile.

    ``ipmtc status``/``remove``/``add`` read the notes instead of asking engines that are busy with a map (an
    apply would wait behind the map's chunks). A daemon thread that polls for the engine id, then ends.
    """
    import threading

    def publish() -> None:
        import json
        import time

        from .cluster import _engine_info

        deadline = time.monotonic() + PUBLISH_WITHIN_S
        while time.monotonic() < deadline:
            try:
                engine_id = _ipp.kernel_parts(_ipp.engine_kernel())[1]
            except Exception:
                engine_id = None
            if engine_id is not None:
                break
            time.sleep(0.1)
        else:
            return
        from .notes import notes_dir

        folder = notes_dir(os.environ.get("IPP_PROFILE_DIR") or ".")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            path = os.path.join(folder, f"{engine_id}.json")
            fd = os.open(path + f".{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(_engine_info(), f)
            os.replace(path + f".{os.getpid()}", path)
        except OSError:
            pass

    threading.Thread(target=publish, name="ipmtc-publish", daemon=True).start()


# what every engine imports after its registration (measured: 148 modules, ~0.05 s of CPU each, a third
# of an engine's start-up CPU): imported once here, before the fork, they are shared by every engine
_SHARED_IMPORTS = ("ipykernel.ipkernel", "ipykernel.zmqshell", "ipykernel.debugger", "IPython.extensions.storemagic",
                   "IPython.core.oinspect", "IPython.core.completerlib", "tornado.platform.asyncio", "sqlite3",
                   "pydoc", "code", "runpy")
# ipyparallel's serializer imports numpy in every engine at its first result (its canning map names
# numpy.ndarray): measured at 256 engines, 8 s of the start-up went to those imports (the state's first apply).
# Imported here only where the engines' thread pools are single-threaded: OpenBLAS reads its thread count once,
# at import, and starts its threads then (a fork must not copy a process with threads).
_SINGLE_THREAD_IMPORTS = ("numpy",)


def _preimport() -> None:
    import importlib
    import threading

    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # debugpy's import-time warning, once per engine
    single = all(os.environ.get(v) == "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"))
    for name in _SHARED_IMPORTS + (_SINGLE_THREAD_IMPORTS if single else ()):
        try:
            importlib.import_module(name)
        except Exception:  # an optional part missing: each engine imports what it needs, as before
            continue
    if threading.active_count() > 1 or _native_threads() > 1:  # (none of the above starts one; checked)
        print("ipmtc.engine: a thread was started by a shared import", file=sys.stderr, flush=True)


def _threads_before_fork() -> None:
    """The engines' thread counts (their pool's layout), set in the forker too: a thread pool imported before the
    fork (numpy's OpenBLAS) is then sized as each engine would have sized it (each engine sets them again)."""
    import json

    from .resources import BIND_ENV, THREAD_VARS

    try:
        threads = int(json.loads(os.environ.get(BIND_ENV) or "{}")["threads_per_engine"])
    except (ValueError, KeyError, TypeError):
        return
    for var in THREAD_VARS:
        os.environ[var] = str(threads)


def _native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _restart_limit() -> int:
    try:
        return max(0, int(os.environ.get("IPMTC_ENGINE_RESTART_LIMIT", "0")))
    except ValueError:
        return 0


def _bind(copy: int | None) -> None:
    """Pin this engine to its cores and GPUs (its pool's layout in $IPMTC_ENGINE_BIND), before user code runs."""
    from .resources import bind_from_environ

    try:
        done = bind_from_environ(copy)
    except Exception as e:  # a node unlike the one `ipmtc start` planned for: say why in the engine's log
        print(f"ipmtc.engine: cannot bind this engine: {e}", file=sys.stderr, flush=True)
        os._exit(3)
    if done is not None:
        note = " (this node has fewer CPUs than cores asked for: cores share CPUs)" if done["wrapped"] else ""
        print(f"ipmtc.engine: pool {done['pool']}, cores {done['cores']} on CPUs {done['cpus']}, "
              f"GPUs {done['gpus'] or '-'}, {done['threads']} threads{note}", file=sys.stderr, flush=True)


def main() -> None:
    copies = _pop_copies(sys.argv)
    mpi = "--mpi" in sys.argv
    if copies and mpi:
        # one process per node forking its engines (srun/mpiexec): no MPI in any of them -- one rank cannot be
        # shared by forks; the forker is what the launcher sees, and it always ends with a plain exit status
        sys.argv.remove("--mpi")
        mpi = False
        _own_log("node")
    elif os.environ.get("IPMTC_ENGINE_MPI") == "0" and mpi:
        # started by srun: a plain engine (no MPI_Init, nothing left in /dev/shm)
        sys.argv.remove("--mpi")
        mpi = False
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _private()
    if mpi:
        _supervise()
    if mpi or os.environ.get("IPMTC_ENGINE_MPI") == "0":
        _own_log("rank" + (os.environ.get("PMI_RANK") or os.environ.get("SLURM_PROCID") or "x"))
    from ipyparallel.engine import app

    copy = None
    if copies:
        _threads_before_fork()
        _preimport()
        copy = _fork_copies(copies, _restart_limit())
        _own_log(f"local{copy}")
    _bind(copy)
    _ipp.install_nanny_starter(_NannyFork().start_nanny)
    _publish_when_registered()
    app.main()


if __name__ == "__main__":
    main()
