"""Map helpers: static and dynamic schedules over one dispatcher."""
from .api import dynamic_map, static_map
from .result import MapResult, TaskFailure, TaskRecord

__all__ = ["MapResult", "TaskFailure", "TaskRecord", "dynamic_map", "static_map"]
