"""Detect the batch allocation (Slurm, PBS/Torque/PBS Pro, LSF) or the local machine.

Everything here is a pure function of the environment (plus reading the PBS node
file), so it can be tested with a plain dict and run on a login node safely.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import hostlist

from .errors import AllocationError


@dataclass(frozen=True)
class Allocation:
    """The hosts (and task slots per host) this run may use."""

    kind: str  # "slurm" | "pbs" | "lsf" | "local"
    job_id: str | None  # None for local
    hosts: tuple[str, ...]  # distinct hosts, allocation order
    slots_per_host: tuple[int, ...]  # task slots per host, same order as hosts
    nodefile: str | None = None  # PBS node file path (for mpiexec -machinefile)
    cpus_per_host: tuple[int, ...] = ()  # cores per host, same order ((): one per task slot)

    def __post_init__(self) -> None:
        # Catch construction bugs early rather than mis-placing engines later.
        if len(self.hosts) != len(self.slots_per_host) or self.cpus_per_host and \
                len(self.cpus_per_host) != len(self.hosts):
            raise AllocationError(
                f"internal: {len(self.hosts)} hosts but {len(self.slots_per_host)} slot counts"
            )

    @property
    def n_hosts(self) -> int:
        return len(self.hosts)

    @property
    def total_slots(self) -> int:
        return sum(self.slots_per_host)

    @property
    def cores(self) -> tuple[int, ...]:
        """Cores per host: what the batch system gave this job there (its task slots where it does not say)."""
        return self.cpus_per_host or self.slots_per_host

    @property
    def is_batch(self) -> bool:
        return self.kind != "local"

    def _where(self) -> str:
        if self.is_batch:
            return f"this {self.kind} allocation {self.job_id}"
        return "the local machine"

    def first(self, n_hosts: int) -> Allocation:
        """The first `n_hosts` hosts of this allocation.

        The PBS node file is only kept when all hosts are kept: it lists every
        host, so handing it to ``mpiexec -machinefile`` for a subset would be wrong.
        """
        if n_hosts < 1:
            raise AllocationError(f"--nodes {n_hosts} is invalid; ask for at least 1 node")
        if n_hosts > self.n_hosts:
            hint = "" if self.is_batch else " (or run inside a batch job)"
            raise AllocationError(
                f"--nodes {n_hosts} but {self._where()} has {_nodes(self.n_hosts)} "
                f"({compress_hosts(self.hosts)}); ask for at most {self.n_hosts}{hint}"
            )
        if n_hosts == self.n_hosts:
            return self
        return Allocation(
            kind=self.kind,
            job_id=self.job_id,
            hosts=self.hosts[:n_hosts],
            slots_per_host=self.slots_per_host[:n_hosts],
            nodefile=None,
            cpus_per_host=self.cpus_per_host[:n_hosts],
        )

    def describe(self) -> str:
        """One line, e.g. ``slurm job 123: 4 nodes n[1-4], 16 slots``."""
        head = f"{self.kind} job {self.job_id}" if self.is_batch else "local"
        slots = f"{self.total_slots} slot{'s' if self.total_slots != 1 else ''}"
        return f"{head}: {_nodes(self.n_hosts)} {compress_hosts(self.hosts)}, {slots}"


def _nodes(n: int) -> str:
    return f"{n} node{'s' if n != 1 else ''}"


def expand_hostlist(value: str) -> list[str]:
    """Expand a Slurm-style hostlist (``n[01-04,07],gpu[1-2]``) into names."""
    try:
        return list(hostlist.expand_hostlist(value))
    except hostlist.BadHostlist as exc:
        raise AllocationError(f"cannot parse hostlist {value!r}: {exc}") from None


def compress_hosts(hosts: Iterable[str]) -> str:
    """Compress host names into a hostlist expression (``n[1-4]``)."""
    return hostlist.collect_hostlist(list(hosts))


_TPN_TOKEN = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def parse_tasks_per_node(value: str) -> list[int]:
    """Expand Slurm's SLURM_TASKS_PER_NODE, e.g. ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for token in value.strip().split(","):
        m = _TPN_TOKEN.match(token.strip())
        if not m:
            raise AllocationError(f"cannot parse SLURM_TASKS_PER_NODE={value!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _int_var(environ: Mapping[str, str], name: str) -> int | None:
    """An integer env var, None if unset/empty; AllocationError if malformed."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise AllocationError(f"{name}={raw!r} is not an integer") from None


def _count_in_order(names: Iterable[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Distinct names in first-appearance order with their occurrence counts."""
    counts: dict[str, int] = {}  # dicts keep insertion order
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return tuple(counts), tuple(counts.values())


def _slurm(environ: Mapping[str, str]) -> Allocation:
    var = "SLURM_JOB_NODELIST" if environ.get("SLURM_JOB_NODELIST") else "SLURM_NODELIST"
    nodelist = environ.get(var, "").strip()
    if not nodelist:
        raise AllocationError(
            "SLURM_JOB_ID is set but SLURM_JOB_NODELIST/SLURM_NODELIST is empty; "
            "run inside salloc/sbatch or set IPMTC_ALLOCATION=local"
        )
    try:
        hosts = list(dict.fromkeys(hostlist.expand_hostlist(nodelist)))
    except hostlist.BadHostlist:
        raise AllocationError(f"cannot parse {var}={nodelist!r}") from None
    n = len(hosts)

    slots: list[int] | None = None
    tpn = environ.get("SLURM_TASKS_PER_NODE", "").strip()
    if tpn:
        parsed = parse_tasks_per_node(tpn)  # malformed -> error even if unused
        # It can disagree with the nodelist (e.g. inside a job step); then fall back.
        if len(parsed) == n:
            slots = parsed
    if slots is None:
        ntasks = _int_var(environ, "SLURM_NTASKS")
        cpus = _int_var(environ, "SLURM_CPUS_ON_NODE")
        if ntasks is not None and ntasks >= n:
            # Spread evenly; any remainder goes to the first hosts (Slurm's block layout).
            base, extra = divmod(ntasks, n)
            slots = [base + (1 if i < extra else 0) for i in range(n)]
        elif cpus is not None and cpus > 0:
            slots = [cpus] * n
        else:
            slots = [1] * n
    cores: tuple[int, ...] = ()
    per_node = environ.get("SLURM_JOB_CPUS_PER_NODE", "").strip()  # e.g. 16(x4): cores, whatever the tasks
    if per_node:
        parsed = parse_tasks_per_node(per_node)
        if len(parsed) == n:
            cores = tuple(parsed)
    return Allocation("slurm", environ["SLURM_JOB_ID"].strip(), tuple(hosts), tuple(slots), cpus_per_host=cores)


def _pbs(environ: Mapping[str, str]) -> Allocation:
    job_id = environ["PBS_JOBID"].strip()
    path = environ.get("PBS_NODEFILE", "").strip()
    if not path:
        raise AllocationError(
            f"PBS job {job_id} but PBS_NODEFILE is not set; "
            "run inside qsub or set IPMTC_ALLOCATION=local"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            # One line per slot; names may repeat non-contiguously (e.g. round-robin).
            names = [line.strip() for line in fh if line.strip()]
    except OSError as exc:
        raise AllocationError(
            f"cannot read PBS_NODEFILE={path!r} ({exc.strerror or exc}); "
            "is this the node the job started on?"
        ) from None
    if not names:
        raise AllocationError(f"PBS_NODEFILE={path!r} is empty")
    hosts, slots = _count_in_order(names)
    return Allocation("pbs", job_id, hosts, slots, nodefile=path)


def _lsf(environ: Mapping[str, str]) -> Allocation:
    job_id = environ["LSB_JOBID"].strip()
    mcpu = environ.get("LSB_MCPU_HOSTS", "").strip()
    if mcpu:
        tokens = mcpu.split()
        if len(tokens) % 2:
            raise AllocationError(
                f"LSB_MCPU_HOSTS={mcpu!r} has an odd number of fields; expected 'host n host n ...'"
            )
        counts: dict[str, int] = {}
        for host, n in zip(tokens[::2], tokens[1::2]):
            if not n.isdigit():
                raise AllocationError(f"LSB_MCPU_HOSTS={mcpu!r}: {n!r} is not a slot count")
            counts[host] = counts.get(host, 0) + int(n)
        return Allocation("lsf", job_id, tuple(counts), tuple(counts.values()))
    lsb_hosts = environ.get("LSB_HOSTS", "").split()  # one name per slot
    if lsb_hosts:
        hosts, slots = _count_in_order(lsb_hosts)
        return Allocation("lsf", job_id, hosts, slots)
    raise AllocationError(
        f"LSF job {job_id} but neither LSB_MCPU_HOSTS nor LSB_HOSTS is set; "
        "run inside bsub or set IPMTC_ALLOCATION=local"
    )


def _local(cpu_count: int | None, hostname: str | None) -> Allocation:
    n = cpu_count or len(os.sched_getaffinity(0)) or 1  # the CPUs this process may use (taskset, cgroups)
    return Allocation("local", None, (hostname or socket.gethostname(),), (n,))


def detect(
    environ: Mapping[str, str] | None = None,
    *,
    cpu_count: int | None = None,
    hostname: str | None = None,
) -> Allocation:
    """Detect the current allocation: Slurm, then PBS, then LSF, else local.

    ``IPMTC_ALLOCATION=local`` forces local, e.g. for a laptop-style cluster
    on one node inside a batch job.
    """
    env = os.environ if environ is None else environ
    override = env.get("IPMTC_ALLOCATION", "").strip().lower()
    if override == "local":
        return _local(cpu_count, hostname)
    if override not in ("", "auto"):
        raise AllocationError(
            f"IPMTC_ALLOCATION={env['IPMTC_ALLOCATION']!r} is not supported; use 'local' or 'auto'"
        )
    if env.get("SLURM_JOB_ID", "").strip():
        return _slurm(env)
    if env.get("PBS_JOBID", "").strip():
        return _pbs(env)
    if env.get("LSB_JOBID", "").strip():
        return _lsf(env)
    return _local(cpu_count, hostname)


# ---------------------------------------------------------------- job end time
#
# Unlike the rest of this module this asks the batch system (squeue / qstat),
# so it runs commands: each through ipmtc._proc.run with a short timeout, and
# any failure (command missing, controller unreachable, odd output) means
# "unknown" (None) rather than an error: a map must not fail because the
# scheduler could not be asked when the job ends.

_END_TIME_CMD_TIMEOUT_S = 5.0
_NO_END = {"", "n/a", "unknown", "none", "unlimited", "infinite", "invalid"}


def _parse_walltime(value: str) -> float | None:
    """``[[DD:]HH:]MM:SS`` / ``DD-HH:MM:SS`` / seconds -> seconds; None if unparseable."""
    value = value.strip()
    if not value:
        return None
    days = 0
    if "-" in value:
        d, _, value = value.partition("-")
        if not d.isdigit():
            return None
        days = int(d)
    parts = value.split(":")
    if len(parts) > 4 or not all(p.replace(".", "", 1).isdigit() for p in parts):
        return None
    nums = [float(p) for p in parts]
    if len(nums) == 4:  # DD:HH:MM:SS
        days += int(nums.pop(0))
    secs = 0.0
    for n in nums:  # [[HH:]MM:]SS
        secs = secs * 60 + n
    return days * 86400 + secs


def _slurm_end_time(environ: Mapping[str, str]) -> float | None:
    raw = environ.get("SLURM_JOB_END_TIME", "").strip()  # set by newer Slurm; not by 22.05
    if raw:
        try:
            return float(raw)
        except ValueError:
            pass
    job = environ.get("SLURM_JOB_ID", "").strip()
    if not job:
        return None
    from datetime import datetime

    from ._proc import run
    from .errors import CommandError

    env = None if environ is os.environ else {**os.environ, **environ}
    try:
        cp = run(["squeue", "-h", "-j", job, "-o", "%e"], timeout_s=_END_TIME_CMD_TIMEOUT_S, env=env,
                 check=False)
    except CommandError:
        return None
    if cp.returncode != 0:
        return None
    lines = cp.stdout.strip().splitlines()
    text = lines[0].strip() if lines else ""
    if text.lower() in _NO_END:
        return None
    try:  # local time, no zone: e.g. 2024-05-01T12:34:56
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def _session_start() -> float | None:
    """When this PBS job started, as seen from here: PBS starts the job script as a session leader.

    Where the leader is outside this PID namespace (``getsid`` says 0, e.g. in a
    container), the oldest visible ancestor in the same session stands in for it.
    """
    import psutil

    try:
        sid = os.getsid(0)
        if sid > 0:
            return psutil.Process(sid).create_time()
        me = psutil.Process()
        start = me.create_time()
        for parent in me.parents():
            if os.getsid(parent.pid) != sid:
                break
            start = parent.create_time()
        return start
    except (OSError, psutil.Error):
        return None


def _pbs_end_time(environ: Mapping[str, str]) -> float | None:
    import shutil
    import time
    from datetime import datetime

    from ._proc import run
    from .errors import CommandError

    job = environ.get("PBS_JOBID", "").strip()
    if not job:
        return None
    env = None if environ is os.environ else {**os.environ, **environ}
    qstat = shutil.which("qstat", path=(env or os.environ).get("PATH"))
    if qstat:
        try:
            cp = run([qstat, "-f", job], timeout_s=_END_TIME_CMD_TIMEOUT_S, env=env, check=False)
        except CommandError:
            cp = None
        if cp is not None and cp.returncode == 0:
            fields: dict[str, str] = {}
            for line in cp.stdout.splitlines():
                key, sep, value = line.strip().partition(" = ")
                if sep:
                    fields[key.strip()] = value.strip()
            now = time.time()
            remaining = fields.get("Walltime.Remaining")  # Torque: seconds left
            if remaining and remaining.lstrip("-").isdigit():
                return now + float(remaining)
            limit = _parse_walltime(fields.get("Resource_List.walltime", ""))
            if limit is not None:
                for key in ("start_time", "stime"):  # Torque / PBS Pro
                    stamp = fields.get(key, "")
                    if stamp.isdigit():
                        return float(stamp) + limit
                    try:
                        return datetime.strptime(" ".join(stamp.split()), "%a %b %d %H:%M:%S %Y").timestamp() \
                            + limit
                    except ValueError:
                        pass
                used = _parse_walltime(fields.get("resources_used.walltime", ""))
                if used is not None:
                    return now + limit - used
    limit = _parse_walltime(environ.get("PBS_WALLTIME", ""))  # Torque: the limit in seconds
    if limit is not None:
        started = _session_start()
        if started is not None:
            return started + limit
    return None


END_TIME_ENV = "IPMTC_JOB_END_TIME"  # epoch seconds or "none": overrides the batch system's answer


def job_end_time(environ: Mapping[str, str] | None = None) -> float | None:
    """Epoch seconds when this batch job ends, or None when unknown / not in a job.

    ``IPMTC_JOB_END_TIME`` (epoch seconds; ``none`` = never) overrides everything.
    Slurm: ``SLURM_JOB_END_TIME`` where set, else ``squeue -h -j $SLURM_JOB_ID -o %e``.
    PBS/Torque: ``qstat -f $PBS_JOBID`` (``Walltime.Remaining``, or ``Resource_List.walltime``
    plus the start time), else ``PBS_WALLTIME`` counted from the start of the job script's session.
    Never raises for a missing or unreachable batch system (None), never waits more than a few seconds.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(END_TIME_ENV, "").strip()
    if value:
        if value.lower() in ("none", "never"):
            return None
        try:
            return float(value)
        except ValueError:
            raise AllocationError(f"IPMTC_JOB_END_TIME={value!r} is not a time in epoch seconds "
                                  "(or 'none')") from None
    if environ.get("IPMTC_ALLOCATION", "").strip().lower() == "local":
        return None
    if environ.get("SLURM_JOB_ID", "").strip():
        return _slurm_end_time(environ)
    if environ.get("PBS_JOBID", "").strip():
        return _pbs_end_time(environ)
    return None
