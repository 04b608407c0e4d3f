"""What every chunk of one map runs with: the function and the engine-side settings.

A :class:`MapSpec` is built once per map (in :mod:`.api`) and travels as it is:
to each engine's listener once per map (:meth:`.channel.Channel.begin_map`), or
with each chunk sent as an apply (:data:`.runner.RUN_CHUNK`), to
:func:`.runner.run_chunk`. Engines unpickle it, so this module imports nothing
heavy; ipyparallel's serializer is imported only when a spec is (un)pickled.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MapSpec:
    """The map's function and how an engine runs each task of it."""

    fn: Callable[..., Any]
    star: bool = False  # fn(*item) instead of fn(item)
    walltime_s: float | None = None  # a task running longer is killed (in a forked child)
    isolate: bool = False  # run tasks in a forked child even without a walltime (aborts kill it)
    publish_start: bool = False  # tell the driver when each task starts (straggler supervision)
    journal_prefix: bytes | None = None  # key the tasks and pickle the ok results for the journal
    max_rss_mb: float | None = None  # a task whose processes' resident memory grows past this is killed

    @property
    def forked(self) -> bool:
        """Whether tasks run in a forked child of the engine."""
        return self.walltime_s is not None or self.isolate or self.max_rss_mb is not None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # the function goes as ipyparallel sends an apply's function (canned: code for one defined in
        # __main__ or a notebook, a reference for one a module defines), not by plain pickle's reference
        from ipyparallel.serialize import can

        return _load, (can(self.fn), self.star, self.walltime_s, self.isolate, self.publish_start,
                       self.journal_prefix, self.max_rss_mb)


def _load(canned_fn: Any, *settings: Any) -> MapSpec:
    """Unpickle a :class:`MapSpec`: the function uncanned in the engine's namespace, as an apply's is."""
    from ipyparallel.serialize import uncan

    return MapSpec(uncan(canned_fn, _user_namespace()), *settings)


def _user_namespace() -> dict[str, Any] | None:
    """The engine's ``user_ns`` (where an apply's function defined in ``__main__`` looks up its globals)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return getattr(shell, "user_ns", None) if shell is not None else None
