"""Map helpers: static and dynamic schedules, and a streaming ``imap``, over one dispatcher."""
from .api import MapStream, dynamic_map, imap, static_map
from .result import MapResult, TaskFailure, TaskRecord

__all__ = ["MapResult", "MapStream", "TaskFailure", "TaskRecord", "dynamic_map", "imap", "static_map"]
