"""Decide how engines are launched: which launcher, how many, where, with which arguments.

Pure: a function of the resolved preset, the allocation and the user's counts.
Kept apart from :mod:`ipmtc.cluster` (which runs processes) so that the whole
policy — srun inside Slurm, mpiexec elsewhere when MPI is there, local
processes otherwise, and the flags that keep one engine's death from taking
the others down — can be read and tested in one place.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from .allocation import Allocation
from .errors import AllocationError, LauncherNotFoundError, SecurityError, SecurityWarning
from .presets import AUTO, Preset
from .resources import DEFAULT_POOL, PoolLayout, layout, parse_pool, pools_from

# hydra's mpiexec kills every rank when one dies unless told not to; srun does
# the same on sites with KillOnBadExit=1 or a non-zero WaitTime.
MPIEXEC_KEEP_GOING = ("-disable-auto-cleanup",)
SRUN_KEEP_GOING = ("--kill-on-bad-exit=0", "--wait=0")


@dataclass(frozen=True)
class EnginePlan:
    """Where and how the engines of one cluster start."""

    launcher: str  # "srun" | "mpiexec" | "local"
    n_engines: int
    hosts: tuple[str, ...]
    engines_per_node: int
    mpi_cmd: tuple[str, ...] = ()
    mpi_args: tuple[str, ...] = ()
    controller_ip: str = "127.0.0.1"
    controller_location: str = "127.0.0.1"
    machinefile_lines: tuple[str, ...] = ()  # hydra machine file for a PBS/LSF subset
    security: str = "curve"  # "curve": CurveZMQ on every socket (and HMAC); "hmac": signed, in clear
    pools: tuple[PoolLayout, ...] = ()  # the engine pools on each node, in start order
    mpi_engines: bool = False  # srun/mpiexec: one rank per engine, not one forker per node

    def describe(self) -> str:
        where = f"{len(self.hosts)} node{'s' if len(self.hosts) != 1 else ''}"
        pools = "; " + "; ".join(p.describe() for p in self.pools) if self.resources_asked else ""
        return f"{self.n_engines} engines on {where} via {self.launcher}{pools}"

    @property
    def resources_asked(self) -> bool:
        """Pools, or engines of more than one core or with GPUs (else: one single-core engine per slot)."""
        return len(self.pools) > 1 or any(p.cores_per_engine > 1 or p.gpus_per_engine for p in self.pools)

    def pool_engines(self, pool: PoolLayout) -> int:
        """How many engines of ``pool`` start (all of them when it is the only pool)."""
        return self.n_engines if len(self.pools) == 1 else pool.engines_per_node * len(self.hosts)

    @property
    def per_node(self) -> bool:
        """srun/mpiexec start one process per node, which imports ipyparallel once and forks the node's
        engines (and restarts one that dies) -- unless MPI engines were asked for, or the engine count is
        not the same on every node."""
        return self.launcher != "local" and not self.mpi_engines and \
            self.n_engines == self.engines_per_node * len(self.hosts)

    def pool_args(self, pool: PoolLayout) -> tuple[str, ...]:
        """The launcher's arguments for one pool's engines (each pool is one srun step / mpiexec / forker)."""
        if self.launcher == "local" or (len(self.pools) <= 1 and not self.per_node):
            return self.mpi_args
        tasks = 1 if self.per_node else pool.engines_per_node
        cores = pool.pool_cores if self.per_node else pool.cores_per_engine
        out: list[str] = []
        skip = False
        for a in self.mpi_args:  # the plan's per-node count is all pools'; each launch gets its own
            if skip:
                skip = False
            elif a in ("--ntasks-per-node", "-ppn", "--cpus-per-task"):
                skip = True
            else:
                out.append(a)
        if self.launcher == "srun":
            several = len(self.pools) > 1
            # each pool's step holds only its own CPUs (--exact), and a CPU pool's no GPU (a step takes every
            # GPU of the job by default, and the next step would wait for them), so every pool's step starts
            gres = ("--gres=none",) if several and not pool.gpus_per_engine else ()
            # GPU engines sharing cores (more of them than cores): Slurm must be told, or the step waits
            over = ("--overcommit",) if not self.per_node and \
                pool.pool_cores < pool.engines_per_node * pool.cores_per_engine else ()
            return ("--ntasks-per-node", str(tasks), "--cpus-per-task", str(max(1, cores)),
                    *(("--exact",) if several else ()), *over, *gres, *out)
        return ("-ppn", str(tasks), *out)


def engine_cmd(copies: int = 0) -> list[str]:
    """argv of one engine process (:mod:`ipmtc.engine`); ``copies``: one process forks that many."""
    return [sys.executable, "-m", "ipmtc.engine"] + (["--copies", str(copies)] if copies else [])


def find_program(name: str) -> str | None:
    """``name`` on PATH, or next to this Python (a venv's ``mpiexec`` from the mpich wheel)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def this_host_address() -> str:
    """An address of this node that other nodes of the allocation can reach."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(addr).is_loopback:
            return addr
    except OSError:
        pass
    # The hostname maps to loopback (common in /etc/hosts): ask the routing table.
    try:
        return _route_source("192.0.2.1")  # TEST-NET-1: the default route
    except OSError:
        return socket.gethostname()


def _route_source(peer: str) -> str:
    """This node's address that the kernel would send from to ``peer`` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return str(s.getsockname()[0])


def _is_this_host(hosts: tuple[str, ...]) -> bool:
    me = {socket.gethostname(), socket.gethostname().split(".")[0], "localhost"}
    return len(hosts) == 1 and (hosts[0] in me or hosts[0].split(".")[0] in me)


def asks_gpus(preset: Preset) -> bool:
    """Whether a start with ``preset`` needs to know the node's GPUs."""
    return bool(preset.gpus_per_engine) or any(parse_pool(t, "pool").gpus_per_engine for t in preset.pools)


def plan_engines(preset: Preset, alloc: Allocation, *, nodes: int | None = None,
                 engines: int | None = None, gpus_per_node: int = 0) -> EnginePlan:
    """Turn the user's counts into an :class:`EnginePlan`; bad combinations raise one-line errors.

    ``gpus_per_node``: the GPUs of the node ``ipmtc start`` runs on (:func:`ipmtc.resources.node_gpus`),
    taken to be every node's.
    """
    if nodes is not None and nodes < 1:
        raise AllocationError(f"--nodes {nodes}: must be at least 1")
    if engines is not None and engines < 1:
        raise AllocationError(f"--engines {engines}: must be at least 1")
    launcher = _choose_launcher(preset, alloc)
    if not alloc.is_batch or launcher == "local":
        n, hosts, epn = _count_on_one_node(preset, alloc, launcher, nodes, engines)
    else:
        n, hosts, epn = _count_across_nodes(preset, alloc, nodes, engines)
    pools = _pools(preset, alloc, hosts, epn, engines, gpus_per_node)
    if launcher == "srun" and sum(1 for p in pools if p.gpus_per_engine) > 1:
        # each srun step takes every GPU of the job unless told otherwise: a second GPU pool's step would wait
        raise AllocationError("several GPU pools under srun are not supported yet; give one GPU pool (and CPU pools)")
    if len(pools) > 1 or pools[0].cores_per_engine > 1 or pools[0].gpus_per_engine:
        epn = sum(p.engines_per_node for p in pools)
        n = epn * len(hosts)
    mpi_cmd, mpi_args, machinefile = _launcher_args(preset, alloc, launcher, hosts, n, epn)
    if len(pools) == 1 and pools[0].cores_per_engine > 1 and launcher == "srun":
        mpi_args = ("--cpus-per-task", str(pools[0].cores_per_engine)) + mpi_args
    ip, location = _controller_addresses(preset, launcher, hosts)
    return EnginePlan(launcher=launcher, n_engines=n, hosts=tuple(hosts), engines_per_node=epn,
                      mpi_cmd=mpi_cmd, mpi_args=mpi_args, controller_ip=ip,
                      controller_location=location, machinefile_lines=machinefile,
                      security=security_mode(preset.security, ip), pools=pools, mpi_engines=bool(preset.mpi_engines))


def _pools(preset: Preset, alloc: Allocation, hosts: tuple[str, ...], epn: int, engines: int | None,
           gpus_per_node: int) -> tuple[PoolLayout, ...]:
    """The pools on each node. Without pools or per-engine resources: one pool of the counted engines,
    single-core, pinned only where every engine has a CPU of its own (the common one engine per core)."""
    threads = None if preset.threads_per_engine == AUTO else int(preset.threads_per_engine)
    simple = not preset.pools and preset.cores_per_engine == 1 and not preset.gpus_per_engine
    if simple:
        return (PoolLayout(DEFAULT_POOL, epn, 1, 0, threads or 1, pool_cores=epn, node_cores=epn, pin="fit"),)
    if preset.pools and (preset.cores_per_engine != 1 or preset.gpus_per_engine or
                         preset.engines_per_node != AUTO or threads is not None):
        raise AllocationError("with pools, give cores-per-engine, gpus-per-engine, engines-per-node and "
                              "threads-per-engine inside each --pool (e.g. --pool cpu:cores-per-engine=2)")
    if engines is not None and (preset.pools or engines % len(hosts)):
        raise AllocationError(f"--engines {engines} with {'pools' if preset.pools else 'resources per engine'}: "
                              "give --nodes and per-node counts instead (engines-per-node)")
    given_epn: int | None = epn if (engines is not None or preset.engines_per_node != AUTO) else None
    cpe = int(preset.cores_per_engine)
    asked = pools_from(preset.pools, cores_per_engine=cpe if cpe > 1 else None,
                       gpus_per_engine=int(preset.gpus_per_engine), engines_per_node=given_epn,
                       threads_per_engine=threads)
    where_hosts = [h for h in hosts if h in alloc.hosts] or list(alloc.hosts)
    cores = min(c for h, c in zip(alloc.hosts, alloc.cores) if h in where_hosts) if alloc.is_batch \
        else alloc.cores[0]
    where = f"each node of {alloc.describe()} ({cores} cores)" if alloc.is_batch else f"this machine ({cores} cores)"
    return layout(asked, cores, gpus_per_node, where=where)


def _choose_launcher(preset: Preset, alloc: Allocation) -> str:
    """The preset's launcher; ``auto``: srun inside Slurm (mpiexec if only that is installed), local
    processes outside a batch job, mpiexec under PBS/LSF."""
    launcher = preset.launcher
    if launcher == "auto":
        launcher = {"slurm": "srun", "local": "local"}.get(alloc.kind, "mpiexec")
        if launcher == "srun" and not find_program("srun") and find_program("mpiexec"):
            launcher = "mpiexec"
    return launcher


def _count_on_one_node(preset: Preset, alloc: Allocation, launcher: str, nodes: int | None,
                       engines: int | None) -> tuple[int, tuple[str, ...], int]:
    """(engines, hosts, engines per node) outside a batch job or with the local launcher: one node."""
    epn_set = preset.engines_per_node != AUTO
    if nodes not in (None, 1):
        if alloc.is_batch:
            raise AllocationError(f"--nodes {nodes}: the local launcher runs engines on this node only; "
                                  "use --launcher srun/mpiexec or --nodes 1")
        raise AllocationError(f"--nodes {nodes}: no batch allocation here ({alloc.describe()}); "
                              "run inside a Slurm/PBS/LSF job or use --engines")
    sub = alloc if not alloc.is_batch else alloc.first(1)
    n = engines or (int(preset.engines_per_node) if epn_set else sub.total_slots)
    if engines and epn_set and engines != int(preset.engines_per_node):
        raise AllocationError(f"--engines {engines} and --engines-per-node {preset.engines_per_node} "
                              "disagree on one node; give only one of them")
    hosts = (socket.gethostname(),) if launcher == "local" else sub.hosts
    return n, hosts, n


def _count_across_nodes(preset: Preset, alloc: Allocation, nodes: int | None,
                        engines: int | None) -> tuple[int, tuple[str, ...], int]:
    """(engines, hosts, engines per node) for srun/mpiexec in a batch job: any two of the three counts."""
    epn_set = preset.engines_per_node != AUTO
    sub = alloc.first(nodes if nodes is not None else alloc.n_hosts)
    if engines is not None:
        if engines < sub.n_hosts:
            raise AllocationError(f"--engines {engines} with --nodes {sub.n_hosts}: fewer engines than "
                                  f"nodes; ask for at least {sub.n_hosts} engines or fewer nodes")
        if epn_set and engines != sub.n_hosts * int(preset.engines_per_node):
            raise AllocationError(
                f"--engines {engines} conflicts with {sub.n_hosts} nodes x --engines-per-node "
                f"{preset.engines_per_node}; give only two of --nodes/--engines/--engines-per-node")
        n = engines
        epn = -(-engines // sub.n_hosts)
    elif epn_set:
        epn = int(preset.engines_per_node)
        n = epn * sub.n_hosts
    else:
        # one engine per task slot the scheduler gave us, as srun would place them
        epn = max(sub.slots_per_host)
        n = sub.total_slots
    return n, sub.hosts, epn


def _launcher_args(preset: Preset, alloc: Allocation, launcher: str, hosts: tuple[str, ...], n: int,
                   epn: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(MPI command, its arguments, hydra machine file lines) for srun/mpiexec; all empty for local."""
    mpi_cmd: tuple[str, ...] = ()
    mpi_args: tuple[str, ...] = ()
    machinefile: tuple[str, ...] = ()
    if launcher in ("srun", "mpiexec"):
        prog = find_program(launcher)
        if prog is None:
            hint = ("pip install 'ipmtc[mpi]' (the mpich wheel provides mpiexec)" if launcher == "mpiexec"
                    else "run inside a Slurm allocation or choose --launcher mpiexec/local")
            raise LauncherNotFoundError(f"launcher {launcher!r} asked for but {launcher} is not installed; {hint}")
        mpi_cmd = (prog,)
        if launcher == "srun":
            mpi_args = ("--nodes", str(len(hosts)))
            if alloc.kind == "slurm" and len(hosts) < alloc.n_hosts:
                mpi_args += ("--nodelist", ",".join(hosts))
            if n == epn * len(hosts):
                mpi_args += ("--ntasks-per-node", str(epn))
            mpi_args += SRUN_KEEP_GOING
        else:
            mpi_args = MPIEXEC_KEEP_GOING
            if alloc.is_batch and len(hosts) < alloc.n_hosts or alloc.kind in ("pbs", "lsf"):
                # a subset (or PBS/LSF hosts): give hydra an explicit machine file
                per = dict(zip(alloc.hosts, alloc.slots_per_host))
                machinefile = tuple(f"{h}:{max(per.get(h, epn), epn)}" for h in hosts)
            if alloc.is_batch and n == epn * len(hosts):
                mpi_args += ("-ppn", str(epn))
        mpi_args += tuple(preset.mpi_args)
    return mpi_cmd, mpi_args, machinefile


def address_toward(hosts: tuple[str, ...]) -> str:
    """This node's address on the interface toward the other ``hosts`` (the route the kernel would
    take to the first of them that resolves); :func:`this_host_address` when none does."""
    me = {socket.gethostname(), socket.gethostname().split(".")[0], "localhost"}
    for host in hosts:
        if host in me or host.split(".")[0] in me:
            continue
        try:
            return _route_source(socket.gethostbyname(host))
        except OSError:
            continue
    return this_host_address()


def _controller_addresses(preset: Preset, launcher: str, hosts: tuple[str, ...]) -> tuple[str, str]:
    """(address the controller listens on, address engines connect to).

    Loopback when all is local; otherwise this node's address on the interface toward
    the allocation's other nodes -- never all interfaces (``0.0.0.0``), which would let
    anyone on any network this node is on reach the controller. ``controller_ip``
    overrides (``0.0.0.0`` included, if a site needs it).
    """
    local_only = launcher == "local" or _is_this_host(hosts)
    ip = preset.controller_ip
    if ip == AUTO:
        ip = "127.0.0.1" if local_only else address_toward(hosts)
    location = preset.controller_location
    if location == AUTO:
        if local_only or _is_loopback(ip):
            location = "127.0.0.1"
        else:
            location = ip if ip not in ("0.0.0.0", "*", "::") else this_host_address()
    return ip, location


def security_mode(asked: str, controller_ip: str) -> str:
    """``curve`` or ``hmac``: what the preset's ``security`` means for a controller listening on ``controller_ip``.

    ``auto`` is curve wherever libzmq has it -- loopback too: on a shared node every user can reach
    loopback, and curve costs nothing measurable (``benchmarks/security.py``). Without curve in libzmq,
    ``auto`` falls back to hmac on loopback (with a warning) and is refused beyond it, as is ``curve``.
    """
    if asked == "hmac":
        return "hmac"
    import zmq

    if zmq.has("curve"):
        return "curve"
    if asked == AUTO and _is_loopback(controller_ip):
        warnings.warn(f"this libzmq ({zmq.zmq_version()}) has no CurveZMQ: the cluster's messages are signed but "
                      "not encrypted (other users of this node could read them); install pyzmq's wheel",
                      SecurityWarning, stacklevel=2)
        return "hmac"
    why = "security: curve" if asked == "curve" else f"the controller listens on {controller_ip}"
    raise SecurityError(f"{why} needs CurveZMQ, but this libzmq ({zmq.zmq_version()}) was built without it; "
                        "install pyzmq's wheel (pip install --force-reinstall pyzmq) or, on a trusted network "
                        "only, set security: hmac")


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:  # a host name
        return ip == "localhost"
