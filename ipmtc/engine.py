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
"""
import os
import signal
import sys

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _own_log() -> None:
    log_dir = os.path.join(os.environ.get("IPP_PROFILE_DIR") or ".", "log")
    rank = os.environ.get("PMI_RANK") or os.environ.get("SLURM_PROCID") or "x"
    node = os.environ.get("SLURMD_NODENAME", "")
    name = f"ipengine-rank{rank}{'-' + node if node else ''}-{os.getpid()}.log"
    try:
        os.makedirs(log_dir, exist_ok=True)
        fd = os.open(os.path.join(log_dir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        return  # keep the inherited streams rather than fail to start
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


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

    def forward(signum: int, _frame: object) -> None:
        try:  # someone signalled this PID alone (hydra signals the whole group)
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            os._exit(1)
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)


def main() -> None:
    mpi = "--mpi" in sys.argv
    if os.environ.get("IPMTC_ENGINE_MPI") == "0" and mpi:
        # started by srun: a plain engine (no MPI_Init, nothing left in /dev/shm)
        sys.argv.remove("--mpi")
        mpi = False
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if mpi:
        _supervise()
    _own_log()
    from ipyparallel.engine.app import main as ipengine_main

    ipengine_main()


if __name__ == "__main__":
    main()
