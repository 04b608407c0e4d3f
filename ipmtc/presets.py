"""Presets: the only home of defaults, and the one place precedence is resolved.

A preset is a flat set of cluster settings. Values come from, lowest first:
built-in default < built-in preset (``profiles/*.yaml``) < preset file given by
path < ``IPMTC_*`` environment < CLI flag.  Some values may be ``auto``: they are
derived from the engine count by :func:`concretize` (rules in the README).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import PresetError

AUTO = "auto"
SCHEMES = ("leastload", "lru", "twobin", "weighted", "plainrandom")
TASK_DBS = ("none", "dict", "sqlite")
LAUNCHERS = ("auto", "srun", "mpiexec", "local")
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "CRITICAL")
SECURITY = ("auto", "curve", "hmac")
ENV_PREFIX = "IPMTC_"


@dataclass(frozen=True)
class Preset:
    """Cluster settings. ``auto`` values are resolved by :func:`concretize`."""

    description: str = ""
    scheme: str = "leastload"  # TaskScheduler.scheme_name ('pure' is excluded: no retries)
    hwm: int = 1  # TaskScheduler.hwm: 1 = dynamic, 0 = greedy/static
    heartbeat_period_ms: int | str = AUTO  # HeartMonitor.period
    heartbeat_misses: int | str = AUTO  # HeartMonitor.max_heartmonitor_misses
    engine_heartbeat_misses: int | str = AUTO  # IPEngine.max_heartbeat_misses (0 = never give up)
    registration_timeout_s: float | str = AUTO  # IPController.registration_timeout
    engine_timeout_s: float | str = AUTO  # IPEngine.timeout (wait for registration reply)
    start_timeout_s: float | str = AUTO  # how long `ipmtc start` waits for all engines
    controller_ip: str = AUTO  # IPController.ip ('auto': loopback if local, else the interface toward the nodes)
    controller_location: str = AUTO  # address written into connection files
    controller_ports: str = ""  # e.g. "10101-10120" (firewalled sites)
    task_db: str = "dict"  # none | dict | sqlite
    launcher: str = "auto"  # auto | srun | mpiexec | local
    mpi_args: tuple[str, ...] = ()  # extra arguments for srun/mpiexec
    engines_per_node: int | str = AUTO  # default: the allocation's task slots per node
    log_level: str = "INFO"
    crash_limit: int = 3  # maps: engines a task may take down before it fails as EngineCrashes
    cores_per_engine: int = 1  # cores each engine is pinned to (OMP_NUM_THREADS & co. follow)
    gpus_per_engine: int = 0  # GPUs each engine sees alone (CUDA_VISIBLE_DEVICES & co.)
    threads_per_engine: int | str = AUTO  # OMP/MKL/OpenBLAS threads per engine ('auto': its cores)
    engine_restarts: int = 3  # engines a node's forker restarts after they die by a signal (then: given up)
    mpi_engines: bool = False  # srun/mpiexec: one MPI rank per engine (mpi4py in tasks) instead of one per node
    pools: tuple[str, ...] = ()  # named engine pools, e.g. ["gpu:gpus-per-engine=1", "cpu:cores-per-engine=1"]
    security: str = "auto"  # curve: CurveZMQ + HMAC on every socket; hmac: signed only; auto: curve if libzmq has it


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(Preset)}
AUTO_OK = {"heartbeat_period_ms", "heartbeat_misses", "engine_heartbeat_misses",
           "registration_timeout_s", "engine_timeout_s", "start_timeout_s",
           "controller_ip", "controller_location", "engines_per_node", "threads_per_engine"}
CHOICES = {"scheme": SCHEMES, "task_db": TASK_DBS, "launcher": LAUNCHERS, "log_level": LOG_LEVELS,
           "security": SECURITY}
# minimum allowed value (inclusive) and whether 0 is allowed for numeric keys
MINIMUM: dict[str, float] = {"hwm": 0, "heartbeat_period_ms": 1, "heartbeat_misses": 1,
                             "engine_heartbeat_misses": 0, "registration_timeout_s": 0.001,
                             "engine_timeout_s": 0.001, "start_timeout_s": 0.001,
                             "engines_per_node": 1, "crash_limit": 1, "cores_per_engine": 1,
                             "gpus_per_engine": 0, "threads_per_engine": 1, "engine_restarts": 0}
INTEGER_KEYS = ("hwm", "heartbeat_period_ms", "heartbeat_misses", "engine_heartbeat_misses", "engines_per_node",
                "crash_limit", "cores_per_engine", "gpus_per_engine", "threads_per_engine", "engine_restarts")
BOOL_KEYS = ("mpi_engines",)
LIST_KEYS = ("mpi_args", "pools")


@dataclass(frozen=True)
class Resolved:
    """A preset together with where each value came from."""

    name: str
    preset: Preset
    sources: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, Any, str]]:
        return [(k, getattr(self.preset, k), self.sources.get(k, "default")) for k in FIELDS]


# ---------------------------------------------------------------- loading


def builtin_dir() -> Path:
    """Where the built-in presets live: inside the wheel, or the checkout's ``profiles/``."""
    here = Path(__file__).resolve().parent
    for d in (here / "profiles", here.parent / "profiles"):
        if d.is_dir():
            return d
    raise PresetError(f"built-in presets not found next to {here}; reinstall ipmtc")


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise PresetError(f"cannot read preset file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PresetError(f"{where}: YAML syntax error: {problem}; fix the file") from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a preset must be a mapping of key: value, got {type(data).__name__}")
    return data


def load_builtin(name: str) -> dict[str, Any]:
    path = builtin_dir() / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(f"unknown preset {name!r}; choose one of {', '.join(builtin_names())} "
                          "or give a path to a YAML file")
    return _read_yaml(path)


def _is_path(preset: str) -> bool:
    return preset.endswith((".yaml", ".yml")) or os.sep in preset


# ---------------------------------------------------------------- validation


def coerce(key: str, value: Any, origin: str) -> Any:
    """Check and convert one value; ``origin`` names where it came from for the message."""
    if key not in FIELDS or key == "description" and origin.startswith("flag"):
        valid = ", ".join(k for k in FIELDS if k != "description" or not origin.startswith("flag"))
        raise PresetError(f"{origin}: unknown key {key!r}; valid keys: {valid}")
    if value is None:
        raise PresetError(f"{origin}: {key} has no value; give one or delete the line")
    if key == "description":
        return str(value)
    if isinstance(value, str) and value.strip().lower() == AUTO and AUTO not in CHOICES.get(key, ()):
        if key in AUTO_OK:
            return AUTO
        raise PresetError(f"{origin}: {key} cannot be 'auto'; give a value")
    default = FIELDS[key].default
    try:
        if key in BOOL_KEYS:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise TypeError
        if key in LIST_KEYS:
            if isinstance(value, str):
                value = shlex.split(value)
            if not isinstance(value, (list, tuple)):
                raise TypeError
            out = tuple(str(v) for v in value)
            if key == "pools":
                from .resources import parse_pool

                for text in out:
                    parse_pool(text, f"{origin}: pools entry")
            return out
        if key in MINIMUM:
            is_int = key in INTEGER_KEYS
            if isinstance(value, bool):
                raise TypeError
            num = float(value)
            if is_int:
                if num != int(num):
                    raise TypeError
                num = int(num)
            if not math.isfinite(num) or num < MINIMUM[key]:
                bound = ">= 0" if MINIMUM[key] == 0 else "> 0"
                raise PresetError(f"{origin}: {key} must be {bound}, got {value!r}")
            return num
        value = str(value)
        if key == "log_level":
            value = value.upper()
        if key in CHOICES and value not in CHOICES[key]:
            raise PresetError(f"{origin}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        return value
    except (TypeError, ValueError, OverflowError):
        kind = ("list of strings" if key in LIST_KEYS else "true or false" if key in BOOL_KEYS
                else "whole number" if key in INTEGER_KEYS
                else "number" if key in MINIMUM else type(default).__name__)
        if key in AUTO_OK:
            kind += " or 'auto'"
        raise PresetError(f"{origin}: {key} must be a {kind}, got {value!r}") from None


def _apply(values: dict[str, Any], sources: dict[str, str], data: Mapping[str, Any], origin: str) -> None:
    for key, value in data.items():
        if key == "extends":
            continue
        values[key] = coerce(key, value, origin)
        sources[key] = origin


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``IPMTC_<KEY>`` variables that name preset keys."""
    out = {}
    for key in FIELDS:
        if key != "description" and (v := environ.get(ENV_PREFIX + key.upper())) is not None:
            out[key] = v
    return out


def resolve(preset: str | None = None, flags: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> Resolved:
    """Resolve settings once: flag > ``IPMTC_*`` env > file by path > built-in preset > default.

    ``preset`` is a built-in name or a path to a YAML file (which may say
    ``extends: <built-in>``; default ``dynamic``). ``IPMTC_PRESET`` picks the
    preset when ``preset`` is None.
    """
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    preset = preset or environ.get(ENV_PREFIX + "PRESET") or "dynamic"
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if _is_path(preset):
        path = Path(preset).expanduser()
        if not path.is_file():
            raise PresetError(f"preset file {path} not found; give an existing YAML file or a built-in "
                              f"name ({', '.join(builtin_names())})")
        data = _read_yaml(path)
        base = str(data.get("extends", "dynamic"))
        _apply(values, sources, load_builtin(base), f"built-in '{base}'")
        _apply(values, sources, data, f"file {path}")
        name = path.stem
    else:
        _apply(values, sources, load_builtin(preset), f"built-in '{preset}'")
        name = preset
    for key, v in env_overrides(environ).items():
        values[key] = coerce(key, v, f"env {ENV_PREFIX}{key.upper()}")
        sources[key] = f"env {ENV_PREFIX}{key.upper()}"
    for key, v in flags.items():
        flag = "--" + key.replace("_", "-")
        values[key] = coerce(key, v, f"flag {flag}")
        sources[key] = f"flag {flag}"
    return Resolved(name=name, preset=Preset(**values), sources=sources)


# ---------------------------------------------------------------- auto rules


def auto_values(n_engines: int, period_ms: int | None = None) -> dict[str, float | int]:
    """The ``auto`` rules, documented in the README.

    Small clusters get a short heartbeat (10 ms per engine, at least 100 ms) so
    engines register fast (registration completes on the first heartbeat); thousands
    of engines get a long one
    (30 s, as in the study) so the controller is not flooded, and timeouts
    that grow with the count (MPI engines of rank >= 100 also wait
    rank x 20 ms before registering).
    """
    n = max(1, n_engines)
    # rules that depend on the heartbeat use the preset's own period when it sets one
    period_ms = int(period_ms or min(30_000, max(100, 10 * n)))
    return {
        "heartbeat_period_ms": period_ms,
        # an engine is declared lost after max(10 beats, 5 s): quick recovery from a lost
        # node, yet a busy controller on a small node does not mistake a slow beat for a
        # lost engine (a killed engine is reported at once by its nanny)
        "heartbeat_misses": max(10, math.ceil(5_000 / period_ms)),
        "engine_heartbeat_misses": max(50, math.ceil(30_000 / period_ms)),
        "registration_timeout_s": round(max(30.0, 5 * period_ms / 1000, 0.05 * n), 1),
        "engine_timeout_s": round(max(10.0, 0.05 * n), 1),
        "start_timeout_s": round(60 + 0.12 * n, 1),
    }


def concretize(resolved: Resolved, n_engines: int) -> Resolved:
    """Replace numeric ``auto`` values by the rule for ``n_engines``.

    Address and per-node values stay ``auto``: they depend on the allocation
    and are decided by the cluster module.
    """
    period = resolved.preset.heartbeat_period_ms
    rules = auto_values(n_engines, None if period == AUTO else int(period))
    changes: dict[str, Any] = {}
    sources = dict(resolved.sources)
    for key, value in rules.items():
        if getattr(resolved.preset, key) == AUTO:
            changes[key] = value
            sources[key] = f"auto ({n_engines} engines)"
    return Resolved(resolved.name, dataclasses.replace(resolved.preset, **changes), sources)


def to_yaml(resolved: Resolved) -> str:
    """The resolved preset as YAML, with each value's origin as a comment."""
    lines = [f"# resolved ipmtc preset '{resolved.name}' (value  # where it came from)"]
    for key, value, src in resolved.rows():
        if isinstance(value, tuple):
            value = list(value)
        dumped = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()
        dumped = dumped[1:-1] if dumped.startswith("{") else dumped
        lines.append(f"{dumped}  # {src}")
    return "\n".join(lines) + "\n"
