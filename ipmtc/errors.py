"""Exceptions. Every message says what is wrong and what to do about it.

The CLI prints an :class:`IpmtcError` as one line on stderr (no traceback);
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from typing import Any


class IpmtcError(Exception):
    """Base of all errors ipmtc raises on purpose (user mistakes, failed starts).

    An error raised while a map ran carries the map's results as ``.result``
    (a :class:`~ipmtc.maps.result.MapResult`): nothing computed is lost.
    """

    result: Any = None


class PresetError(IpmtcError):
    """A preset (built-in, file, environment or flag) is unknown or invalid."""


class AllocationError(IpmtcError):
    """The batch allocation cannot be read or does not fit the request."""


class ResourceError(AllocationError):
    """Cores, GPUs or pools asked for that no node of the allocation has (or a malformed request)."""


class ClusterError(IpmtcError):
    """A cluster cannot be found, started, reached or stopped."""


class NoClusterError(ClusterError):
    """No running cluster for this profile."""


class ClusterRunningError(ClusterError):
    """A cluster is already running under this profile."""


class StartupError(ClusterError):
    """Engines did not register in time; carries the log tails."""


class LauncherNotFoundError(ClusterError):
    """The requested engine launcher (srun, mpiexec) is not installed."""


class SecurityError(IpmtcError):
    """A private file or directory others can reach, or protection asked for that cannot be had."""


class MapError(IpmtcError):
    """Bad arguments to a map, detected before anything is submitted."""


class EnginesLostError(IpmtcError):
    """Every engine is gone while tasks were outstanding."""


class ControllerLostError(ClusterError):
    """The controller is gone and no engine can run the map's tasks without it (``.result`` holds the rest)."""


class JournalError(IpmtcError):
    """The task journal cannot be used (locked, foreign, incompatible, unwritable)."""


class ReportError(IpmtcError):
    """A run cannot be read for a report (missing, not a saved map or journal, damaged)."""


class CommandError(IpmtcError):
    """A helper command (sbatch, scontrol, ...) failed or timed out."""


class TaskFileError(IpmtcError):
    """A task file of ``ipmtc run`` cannot be read or holds no commands."""


# ---------------------------------------------------------------- task outcomes (not user mistakes)
# Raised on an engine for one task and carried back to the driver as that task's failure;
# they derive from Exception, not IpmtcError: the CLI never prints them as its own errors.


class CommandFailed(Exception):
    """A command task exited with a non-zero status (or was killed by a signal)."""


class CommandWalltime(Exception):
    """A command task ran past its walltime and was killed."""


class ChannelLost(Exception):
    """A chunk's listener went away before answering (the chunk is run again, uncharged).

    ``engine_died``: its connection dropped without a goodbye (the engine process is gone).
    """

    ename = "ChannelLost"

    def __init__(self, message: str = "", engine_died: bool = False):
        super().__init__(message)
        self.engine_died = engine_died


class ChunkFailed(Exception):
    """The chunk could not run at all on the engine (each of its tasks is charged)."""

    def __init__(self, err: dict[str, str]):
        super().__init__(err.get("evalue", ""))
        self.ename = err.get("ename", "")
        self.evalue = err.get("evalue", "")
        self.traceback = err.get("traceback", "")


class SecurityWarning(UserWarning):
    """Protection weaker than the default, because this installation cannot give more (said once)."""


class JournalWarning(UserWarning):
    """The journal stopped recording during a map (the map itself goes on)."""
