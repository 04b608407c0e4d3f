"""Pin one MPI rank of a wide ``ipmtc run`` line to its core, then become the program (``os.execv``).

Run as ``python -I _rank.py '<{"node": [cpu, ...]}>' prog args...`` by the line's launcher (srun or
hydra's mpiexec), once per rank: the rank finds its node (``SLURMD_NODENAME``, else the host name)
and its number there (``SLURM_LOCALID`` / ``MPI_LOCALRANKID``) and takes that CPU of the ones the
driver granted on that node. A file run by path, not ``-m ipmtc...``: importing the package would
cost each rank a few hundred ms.
"""
import json
import os
import socket
import sys


def main() -> None:
    cpus_of = json.loads(sys.argv[1])
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    cpus = cpus_of.get(node) or cpus_of.get(node.split(".")[0])
    # hydra's first: under Slurm its ranks inherit its proxies' SLURM_LOCALID (0 on every rank)
    local = next((int(os.environ[v]) for v in ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")
                  if os.environ.get(v, "").isdigit()), 0)
    cpu = cpus[local % len(cpus)] if cpus else -1
    if cpu >= 0:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:  # a CPU this node does not have (an oversubscribed test node): keep the inherited mask
            pass
        os.environ["IPMTC_RANK_CPU"] = str(cpu)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.execv(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
