"""Cores and GPUs per engine, engine pools, and binding each engine to its share of a node.

Two halves, both without processes of their own:

- the driver's (:func:`parse_pool`, :func:`layout`, :func:`node_gpus`): which pools, how many
  engines of each per node, and where on the node each pool's cores and GPUs begin. Nodes are
  taken as alike (one layout for all; the smallest node's counts), as ``srun --ntasks-per-node``
  and hydra's ``-ppn`` have it;
- the engine's (:func:`bind_engine`): run once in each engine process before anything else is
  imported, it pins the process to its cores (``os.sched_setaffinity``), shows it only its GPUs
  (``CUDA_VISIBLE_DEVICES``, ``ROCR_VISIBLE_DEVICES``, ``ZE_AFFINITY_MASK``) and sets the thread
  counts of OpenMP/BLAS libraries to its core count, so a threaded numpy fills exactly its share.

A node's cores are numbered 0..C-1 in the order of the CPUs the engine may use there (its inherited
affinity: what the batch system left it). Where a batch system declares more cores than the node has
(oversubscribed test nodes), the numbers wrap around the real CPUs, and the engine's log says so.
Where the launcher already bound the engine to exactly its share (``srun --cpus-per-task`` with
Slurm's task/affinity), that binding is kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

from .errors import ResourceError

BIND_ENV = "IPMTC_ENGINE_BIND"  # the pool's layout, JSON, in each engine's environment
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")
GPU_VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
DEFAULT_POOL = "default"
POOL_KEYS = ("cores-per-engine", "gpus-per-engine", "engines-per-node", "threads-per-engine")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Pool:
    """What the user asked of one pool (None: derived by :func:`layout`)."""

    name: str = DEFAULT_POOL
    cores_per_engine: int | None = None
    gpus_per_engine: int = 0
    engines_per_node: int | None = None
    threads_per_engine: int | None = None  # None: = cores per engine


@dataclass(frozen=True)
class PoolLayout:
    """One pool on every node: its engines, and where its cores and GPUs begin on the node."""

    name: str
    engines_per_node: int
    cores_per_engine: int
    gpus_per_engine: int
    threads_per_engine: int
    core_offset: int = 0
    gpu_offset: int = 0
    pool_cores: int = 0  # cores this pool uses on a node (fewer than engines x cores: GPU engines sharing)
    node_cores: int = 0  # cores all pools use on a node
    hide_gpus: bool = False  # a CPU pool beside a GPU pool: its engines see no GPU at all
    pin: str = "always"  # "always": asked for; "fit": only where the node has a CPU for every core used; "none"

    def env(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def describe(self) -> str:
        gpus = f", {self.gpus_per_engine} GPU{'s' if self.gpus_per_engine != 1 else ''}" if self.gpus_per_engine else ""
        return (f"pool {self.name}: {self.engines_per_node}/node x {self.cores_per_engine} "
                f"core{'s' if self.cores_per_engine != 1 else ''}{gpus}")


# ---------------------------------------------------------------- driver side: asking


def parse_pool(text: str, origin: str = "--pool") -> Pool:
    """``NAME:key=value,key=value`` (keys :data:`POOL_KEYS`) -> :class:`Pool`; one-line error if malformed."""
    name, sep, rest = text.strip().partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise ResourceError(f"{origin} {text!r}: a pool needs a name (letters, digits, '-', '_'; first a letter) "
                            "before ':', e.g. --pool gpu:gpus-per-engine=1")
    values: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))) if sep else ():
        key, eq, value = part.partition("=")
        key = key.strip().replace("_", "-")
        if key not in POOL_KEYS or not eq:
            raise ResourceError(f"{origin} {text!r}: {part!r} is not KEY=VALUE with KEY one of {', '.join(POOL_KEYS)}")
        try:
            n = int(value.strip())
        except ValueError:
            raise ResourceError(f"{origin} {text!r}: {key} must be a whole number, got {value.strip()!r}") from None
        low = 0 if key == "gpus-per-engine" else 1
        if n < low:
            raise ResourceError(f"{origin} {text!r}: {key} must be >= {low}, got {n}")
        values[key.replace("-", "_")] = n
    return Pool(name=name, **values)


def pools_from(pool_texts: Sequence[str], *, cores_per_engine: int | None = None, gpus_per_engine: int = 0,
               engines_per_node: int | None = None, threads_per_engine: int | None = None) -> tuple[Pool, ...]:
    """The pools a preset asks for: its ``pools`` list, or one pool of its per-engine keys."""
    if not pool_texts:
        return (Pool(DEFAULT_POOL, cores_per_engine, gpus_per_engine, engines_per_node, threads_per_engine),)
    pools = tuple(parse_pool(t, "pool") for t in pool_texts)
    names = [p.name for p in pools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ResourceError(f"pool {dup!r} is given twice; give each pool once, with all its keys")
    return pools


def layout(pools: Sequence[Pool], cores_per_node: int, gpus_per_node: int, *, where: str = "a node") -> tuple[
        PoolLayout, ...]:
    """Lay the pools out on a node of ``cores_per_node`` cores and ``gpus_per_node`` GPUs, in the order given.

    A pool without ``engines_per_node`` gets as many engines as fit in what the pools before it left:
    GPUs / ``gpus_per_engine`` for a GPU pool, else cores / ``cores_per_engine``. A GPU pool without
    ``cores_per_engine`` takes an even share of the cores left when it is the last pool, else one core
    per engine (leaving the rest to the pools after it).
    """
    out: list[PoolLayout] = []
    core_at = gpu_at = 0
    for i, p in enumerate(pools):
        last = i == len(pools) - 1
        cores_left, gpus_left = cores_per_node - core_at, gpus_per_node - gpu_at
        label = f"pool {p.name!r}: " if p.name != DEFAULT_POOL else ""
        if p.gpus_per_engine:
            if gpus_per_node == 0:
                raise ResourceError(f"{label}{p.gpus_per_engine} GPU(s) per engine asked, but {where} has no GPUs "
                                    "(none in CUDA_VISIBLE_DEVICES/ROCR_VISIBLE_DEVICES, SLURM_JOB_GPUS/"
                                    "SLURM_GPUS_ON_NODE, nvidia-smi or rocm-smi); ask the batch system for GPUs "
                                    "(e.g. sbatch --gpus-per-node=4) or drop --gpus-per-engine")
            if gpus_left < 1:
                raise ResourceError(f"{label}no GPUs left on {where} after the pools before it; give those pools "
                                    "engines-per-node (or fewer GPUs per engine)")
            if p.gpus_per_engine > gpus_left:
                raise ResourceError(f"{label}{p.gpus_per_engine} GPUs per engine, but {where} has {gpus_left} "
                                    f"GPU{'s' if gpus_left != 1 else ''} {'left' if gpu_at else 'in all'}; "
                                    f"ask for at most {gpus_left}")
            epn = p.engines_per_node or gpus_left // p.gpus_per_engine
            if epn * p.gpus_per_engine > gpus_left:
                raise ResourceError(f"{label}{epn} engines x {p.gpus_per_engine} GPUs per node, but {where} has "
                                    f"{gpus_left} GPUs left; ask for fewer engines per node")
        else:
            epn = p.engines_per_node or 0
        if cores_left < 1:
            raise ResourceError(f"{label}no cores left on {where} after the pools before it; give those pools "
                                "engines-per-node (or fewer cores per engine)")
        shared = False
        if p.cores_per_engine is not None:
            cpe = p.cores_per_engine
        elif p.gpus_per_engine and epn:
            cpe = max(1, cores_left // epn) if last else 1
            shared = epn > cores_left  # more GPUs than cores: GPU engines share the cores (they mostly wait)
        else:
            cpe = 1
        if cpe > cores_left:
            raise ResourceError(f"{label}{cpe} cores per engine, but {where} has {cores_left} "
                                f"core{'s' if cores_left != 1 else ''} {'left' if core_at else 'in all'}; "
                                f"ask for at most {cores_left}")
        if not epn:
            epn = cores_left // cpe
        if epn * cpe > cores_left and not shared:
            raise ResourceError(f"{label}{epn} engines x {cpe} core{'s' if cpe != 1 else ''} per node, but {where} "
                                f"has {cores_left} cores {'left' if core_at else 'in all'}; ask for fewer engines "
                                "per node")
        out.append(PoolLayout(p.name, epn, cpe, p.gpus_per_engine, p.threads_per_engine or cpe, core_at, gpu_at,
                              pool_cores=min(epn * cpe, cores_left)))
        core_at += min(epn * cpe, cores_left)
        gpu_at += epn * p.gpus_per_engine
    any_gpus = any(p.gpus_per_engine for p in out)
    return tuple(replace(p, node_cores=core_at, hide_gpus=any_gpus and not p.gpus_per_engine) for p in out)


# ---------------------------------------------------------------- GPUs on this node


@dataclass(frozen=True)
class Gpus:
    """The GPUs this node shows this process, as their ids, and where that came from."""

    ids: tuple[str, ...]
    source: str  # the variable or program that said so
    vars: tuple[str, ...]  # the variables that select among them (what an engine's share is written to)


def _id_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def node_gpus(environ: Mapping[str, str] | None = None, *, probe: bool = True) -> Gpus:
    """The GPUs of this node: an inherited visibility list first (the batch system, or a wrapper, has
    already limited what this process sees: its ids are what the engines must subset), then Slurm's
    (``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``, ``SLURM_GPUS_ON_NODE``), PBS's ``PBS_NGPUS``, then
    ``nvidia-smi -L`` / ``rocm-smi`` when ``probe``. No GPUs: an empty list."""
    env = os.environ if environ is None else environ
    for var in GPU_VARS:
        raw = env.get(var)
        if raw is not None and raw.strip() not in ("", "NoDevFiles"):
            ids = _id_list(raw)
            if ids and ids != ("-1",):
                return Gpus(ids, var, (var,))
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        ids = _id_list(env.get(var, ""))
        if ids:
            return Gpus(ids, var, GPU_VARS)
    for var in ("SLURM_GPUS_ON_NODE", "PBS_NGPUS"):
        raw = env.get(var, "").strip()
        if raw.isdigit() and int(raw) > 0:
            return Gpus(tuple(str(i) for i in range(int(raw))), var, GPU_VARS)
    if probe:
        for prog, pattern in (("nvidia-smi", r"^GPU (\d+):"), ("rocm-smi", r"^GPU\[(\d+)\]")):
            path = shutil.which(prog, path=env.get("PATH"))
            if not path:
                continue
            try:
                cp = subprocess.run([path, "-L"] if prog == "nvidia-smi" else [path, "--showid"],
                                    capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S,
                                    stdin=subprocess.DEVNULL, check=False)
            except (OSError, subprocess.TimeoutExpired):
                continue
            ids = tuple(dict.fromkeys(re.findall(pattern, cp.stdout, re.M)))
            if cp.returncode == 0 and ids:
                return Gpus(ids, prog, GPU_VARS)
    return Gpus((), "none", GPU_VARS)


# ---------------------------------------------------------------- engine side: binding


def local_index(environ: Mapping[str, str], copy: int | None = None) -> int:
    """This engine's number among its pool's engines on this node: the forked copy's, srun's
    ``SLURM_LOCALID``, hydra's ``MPI_LOCALRANKID``, Open MPI's ``OMPI_COMM_WORLD_LOCAL_RANK``; else 0."""
    if copy is not None:
        return copy
    # an MPI launcher's first: hydra inside Slurm runs under an srun of its own, whose SLURM_LOCALID
    # (0 on every rank of a node) the ranks inherit
    for var in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK", "SLURM_LOCALID"):
        raw = environ.get(var, "").strip()
        if raw.isdigit():
            return int(raw)
    return 0


def node_cpus() -> list[int]:
    """The CPUs this process may run on, in order (what the batch system left it)."""
    return sorted(os.sched_getaffinity(0))


def share(cpus: Sequence[int], first: int, count: int) -> tuple[int, ...]:
    """Cores ``first .. first+count-1`` of a node whose usable CPUs are ``cpus`` (wrapping around them)."""
    return tuple(sorted({cpus[(first + k) % len(cpus)] for k in range(count)}))


def bind_engine(spec: PoolLayout, index: int, environ: dict[str, str] | None = None) -> dict[str, object]:
    """Pin this process to engine ``index``'s cores of ``spec``, show it only its GPUs, set thread counts.

    Returns what was done (for the engine's log and ``ipmtc status``). Runs in the engine before
    ipyparallel or any user module is imported (thread pools read their variables once, at import).
    """
    env = os.environ if environ is None else environ
    cpus = node_cpus()
    span = spec.pool_cores or spec.engines_per_node * spec.cores_per_engine
    first = spec.core_offset + (index % max(1, spec.engines_per_node)) * spec.cores_per_engine % max(1, span)
    cores = tuple(range(first, first + spec.cores_per_engine))
    wrapped = max(spec.node_cores, first + spec.cores_per_engine) > len(cpus)
    if len(cpus) == spec.cores_per_engine and spec.engines_per_node > 1:
        mine = tuple(cpus)  # the launcher bound this engine to exactly its share already: keep it
        wrapped = False
    elif spec.pin == "none" or (wrapped and spec.pin != "always"):
        mine = tuple(cpus)  # more engines than CPUs, not asked to pin: the kernel balances them better
    else:
        mine = share(cpus, first, spec.cores_per_engine)
        os.sched_setaffinity(0, mine)
    for var in THREAD_VARS:
        env[var] = str(spec.threads_per_engine)
    gpus: tuple[str, ...] = ()
    if spec.gpus_per_engine:
        found = node_gpus(env)
        g0 = spec.gpu_offset + (index % max(1, spec.engines_per_node)) * spec.gpus_per_engine
        gpus = found.ids[g0:g0 + spec.gpus_per_engine]
        if len(found.ids) == spec.gpus_per_engine:
            gpus = found.ids  # the launcher gave this engine exactly its share already (srun --gpus-per-task)
        if len(gpus) < spec.gpus_per_engine:
            raise ResourceError(f"engine {index} of pool {spec.name!r} needs GPUs {g0}..{g0 + spec.gpus_per_engine - 1}"
                                f" but this node shows {len(found.ids)} ({found.source})")
        for var in found.vars:
            env[var] = ",".join(gpus)
        env["IPMTC_ENGINE_GPUS"] = ",".join(gpus)
    elif spec.hide_gpus:
        for var in GPU_VARS:  # a CPU pool beside a GPU pool sees no GPU (it would share them unknowingly)
            env[var] = "" if var != "ZE_AFFINITY_MASK" else "-1"
    env["IPMTC_POOL"] = spec.name
    env["IPMTC_ENGINE_CORES"] = ",".join(map(str, cores))
    return {"pool": spec.name, "cores": list(cores), "cpus": list(mine), "gpus": list(gpus),
            "threads": spec.threads_per_engine, "wrapped": wrapped}


def bind_from_environ(copy: int | None = None) -> dict[str, object] | None:
    """:func:`bind_engine` with the layout ipmtc put in ``$IPMTC_ENGINE_BIND`` (None: not asked)."""
    raw = os.environ.get(BIND_ENV)
    if not raw:
        return None
    spec = PoolLayout(**json.loads(raw))
    return bind_engine(spec, local_index(os.environ, copy))


def engine_resources() -> dict[str, object]:
    """Run on an engine: its pool, cores (the node's numbering), CPUs and GPUs, as it sees them now."""
    import os

    gpus = next((os.environ[v] for v in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
                 if os.environ.get(v)), "")
    return {"pool": os.environ.get("IPMTC_POOL", DEFAULT_POOL),
            "cores": os.environ.get("IPMTC_ENGINE_CORES", ""),
            "cpus": ",".join(map(str, sorted(os.sched_getaffinity(0)))),
            "gpus": gpus, "threads": os.environ.get("OMP_NUM_THREADS", "")}
