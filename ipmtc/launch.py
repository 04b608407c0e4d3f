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

    def describe(self) -> str:
        where = f"{len(self.hosts)} node{'s' if len(self.hosts) != 1 else ''}"
        return f"{self.n_engines} engines on {where} via {self.launcher}"


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


def plan_engines(preset: Preset, alloc: Allocation, *, nodes: int | None = None,
                 engines: int | None = None) -> EnginePlan:
    """Turn the user's counts into an :class:`EnginePlan`; bad combinations raise one-line errors."""
    if nodes is not None and nodes < 1:
        raise AllocationError(f"--nodes {nodes}: must be at least 1")
    if engines is not None and engines < 1:
        raise AllocationError(f"--engines {engines}: must be at least 1")
    launcher = _choose_launcher(preset, alloc)
    if not alloc.is_batch or launcher == "local":
        n, hosts, epn = _count_on_one_node(preset, alloc, launcher, nodes, engines)
    else:
        n, hosts, epn = _count_across_nodes(preset, alloc, nodes, engines)
    mpi_cmd, mpi_args, machinefile = _launcher_args(preset, alloc, launcher, hosts, n, epn)
    ip, location = _controller_addresses(preset, launcher, hosts)
    return EnginePlan(launcher=launcher, n_engines=n, hosts=tuple(hosts), engines_per_node=epn,
                      mpi_cmd=mpi_cmd, mpi_args=mpi_args, controller_ip=ip,
                      controller_location=location, machinefile_lines=machinefile,
                      security=security_mode(preset.security, ip))


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
