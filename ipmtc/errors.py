"""Exceptions. Every message says what is wrong and what to do about it.

The CLI prints an :class:`IpmtcError` as one line on stderr (no traceback);
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class IpmtcError(Exception):
    """Base of all errors ipmtc raises on purpose (user mistakes, failed starts)."""


class PresetError(IpmtcError):
    """A preset (built-in, file, environment or flag) is unknown or invalid."""


class AllocationError(IpmtcError):
    """The batch allocation cannot be read or does not fit the request."""


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


class MapError(IpmtcError):
    """Bad arguments to a map, detected before anything is submitted."""


class EnginesLostError(IpmtcError):
    """Every engine is gone while tasks were outstanding."""


class JournalError(IpmtcError):
    """The task journal cannot be used (locked, foreign, incompatible, unwritable)."""
