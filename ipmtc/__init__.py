"""ipmtc: many-task computing on HPC clusters with IPython Parallel.

One allocation, thousands of independent tasks, every result back::

    import ipmtc
    rc = ipmtc.connect()                      # the cluster `ipmtc start` left running
    res = ipmtc.dynamic_map(simulate, params, retries=2, walltime_s=600)
"""
from __future__ import annotations

from .cluster import ClusterInfo, connect, list_clusters, start, status, stop
from .commands import run_commands
from .errors import (
                     AllocationError,
                     ClusterError,
                     ControllerLostError,
                     EnginesLostError,
                     IpmtcError,
                     JournalError,
                     MapError,
                     NoClusterError,
                     PresetError,
                     ResourceError,
                     SecurityError,
                     StartupError,
)
from .maps import MapResult, MapStream, TaskFailure, TaskRecord, dynamic_map, imap, static_map

__version__ = "0.1.0"

__all__ = [
    "AllocationError", "ClusterError", "ClusterInfo", "ControllerLostError", "EnginesLostError", "IpmtcError",
    "JournalError", "MapStream", "imap",
    "MapError", "NoClusterError", "PresetError", "ResourceError", "SecurityError", "StartupError", "connect",
    "list_clusters", "start",
    "status", "stop", "__version__", "MapResult", "TaskFailure", "TaskRecord", "dynamic_map", "static_map",
    "run_commands",
]
