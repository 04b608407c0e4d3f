"""Engine entry point for MPI-launched engines: ``python -m ipmtc.engine --mpi ...``.

It runs ipyparallel's own engine unchanged, after two things that keep one
rank's death from taking the other ranks down (measured here with the mpich 5
wheel and ``mpiexec -disable-auto-cleanup``; without them, SIGKILL of one engine
ended all the others within 0.2 s, or at their next task):

- hydra notifies the surviving ranks with SIGUSR1, whose default action
  terminates the process: ignore it;
- hydra stops forwarding the ranks' stdout/stderr, so the next log line kills
  the engine: write each engine's output to its own file in the profile's log/.

Under srun (``IPMTC_ENGINE_MPI=0``) the engine is started without ``--mpi``: srun
places and supervises each engine, which needs no MPI at all.
"""
import os
import signal
import sys


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


def main() -> None:
    if os.environ.get("IPMTC_ENGINE_MPI") == "0" and "--mpi" in sys.argv:
        # started by srun: a plain engine (no MPI_Init, nothing left in /dev/shm)
        sys.argv.remove("--mpi")
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _own_log()
    from ipyparallel.engine.app import main as ipengine_main

    ipengine_main()


if __name__ == "__main__":
    main()
