"""``static_map`` and ``dynamic_map``: argument checks, settings resolved once, then one :class:`Dispatcher`."""
from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from ..errors import JournalError, MapError
from .dispatch import Dispatcher
from .options import Options, Schedule
from .result import MapResult
from .spec import MapSpec

if TYPE_CHECKING:
    from ..journal import Journal


def _check(fn, retries, walltime_s, chunksize, fast_abort) -> None:
    """Bad input is refused before anything is sent."""
    if not callable(fn):
        raise MapError(f"the function to map must be callable, got {type(fn).__name__}: {fn!r:.60}")
    if isinstance(retries, bool) or not isinstance(retries, numbers.Integral) or cast(int, retries) < 0:
        raise MapError(f"retries must be an integer >= 0, got {retries!r}")
    if walltime_s is not None and (isinstance(walltime_s, bool) or not isinstance(walltime_s, numbers.Real)
                                   or not cast(float, walltime_s) > 0):
        raise MapError(f"walltime_s must be a number of seconds > 0 (or None for no limit), got {walltime_s!r}")
    if chunksize != "auto" and (isinstance(chunksize, bool) or not isinstance(chunksize, numbers.Integral)
                                or cast(int, chunksize) < 1):
        raise MapError(f"chunksize must be 'auto' or an integer >= 1, got {chunksize!r}")
    if fast_abort is not None and (isinstance(fast_abort, bool) or not isinstance(fast_abort, numbers.Real)
                                   or not cast(float, fast_abort) > 1):
        raise MapError(f"fast_abort must be a factor > 1 of the median task time (e.g. 3), got {fast_abort!r}")
    _check_serializable(fn)


def _check_serializable(fn: Callable) -> None:
    from ipyparallel.serialize import pack_apply_message

    try:
        pack_apply_message(fn, (), {})
    except Exception as e:
        name = getattr(fn, "__qualname__", repr(fn))
        raise MapError(f"function {name} cannot be sent to the engines: {type(e).__name__}: {e}; "
                       "define it at module level or avoid capturing locks, files or sockets") from None


def _client_and_views(client):
    """Accept a Client, a view, or None (connect to this job's cluster)."""
    import ipyparallel as ipp

    if client is None:
        from ..cluster import connect

        client = connect()
    if isinstance(client, (ipp.LoadBalancedView, ipp.DirectView)):
        targets = client.targets
        ids = None if targets in (None, "all") else list(
            targets if isinstance(targets, (list, tuple, range)) else [targets])
        return client.client, ids
    if isinstance(client, ipp.Client):
        return client, None
    raise MapError(f"client must be an ipyparallel Client or view, got {type(client).__name__}")


def _source(items: Iterable[Any]):
    return iter(enumerate(items))


def _open_journal(journal: Any, fn: Callable, retry_failed: bool) -> Journal:
    """The journal to record into: the one given (checked against ``fn``) or one opened at a path."""
    from ..journal import Journal

    if isinstance(journal, Journal):
        journal.check_function(fn)  # a journal of another function is refused too
        return journal
    return Journal.open(journal, fn=fn, retry_failed=retry_failed)


def _settings(schedule: Schedule, fn: Callable, *, retries: int, walltime_s: float | None,
              chunksize: int | str, fast_abort: float | None, ordered: bool, star: bool, progress: bool,
              drain_at: float | str | None, drain_margin_s: float, journal: Journal | None,
              key: Callable[[Any], str] | None) -> tuple[MapSpec, Options]:
    """The user's arguments (checked) resolved once: what engines run with, what the dispatcher does."""
    if drain_at == "auto":  # inside a batch job: its end time, so nothing is lost to the kill
        from ..allocation import job_end_time

        drain_at = job_end_time()
    journal_prefix = None
    if journal is not None:
        from ..keys import key_function, key_prefix

        if key is None:  # the default key is worked out on the engines, with the task
            journal_prefix = key_prefix(fn)
        key = key or key_function(fn)  # the function's identity, worked out once
    else:
        key = None
    spec = MapSpec(fn, star=star, walltime_s=walltime_s,
                   isolate=walltime_s is not None or fast_abort is not None,
                   publish_start=fast_abort is not None, journal_prefix=journal_prefix)
    opts = Options(schedule=schedule, retries=int(retries), fast_abort=fast_abort,
                   chunksize="auto" if chunksize == "auto" else int(chunksize), ordered=ordered,
                   progress=progress, drain_at=cast("float | None", drain_at), drain_margin_s=drain_margin_s,
                   journal=journal, key=key)
    return spec, opts


def _map(schedule: Schedule, fn, items, *, client, retries, walltime_s, chunksize, fast_abort, ordered, star,
         progress, drain_at, drain_margin_s, journal, key, retry_failed) -> MapResult:
    _check(fn, retries, walltime_s, chunksize, fast_abort)
    if items is None:
        raise MapError("items must be an iterable of task inputs, got None")
    try:
        n_total = len(items)
    except TypeError:
        n_total = None
    try:
        iterator = _source(items)
    except TypeError:
        raise MapError(f"items must be iterable, got {type(items).__name__}") from None
    rc, engines = _client_and_views(client)
    if not rc.ids:
        raise MapError("the cluster has no engines; start some with `ipmtc start` and try again")
    jr = None if journal is None else _open_journal(journal, fn, retry_failed)
    try:
        spec, opts = _settings(schedule, fn, retries=retries, walltime_s=walltime_s, chunksize=chunksize,
                               fast_abort=fast_abort, ordered=ordered, star=star, progress=progress,
                               drain_at=drain_at, drain_margin_s=drain_margin_s, journal=jr, key=key)
        res = Dispatcher(rc, spec, iterator, n_total, opts, engines=engines).run()
    finally:
        if jr is not None and jr is not journal:
            jr.close()
    if jr is not None and jr.error is not None:  # e.g. disk full mid-map: say so, lose nothing
        err = JournalError(f"{jr.error}; the {len(res)} results of this map are in this error's .result")
        err.result = res
        raise err
    return res


def dynamic_map(fn: Callable, items: Iterable[Any], *, client=None, retries: int = 0,
                walltime_s: float | None = None, chunksize: int | str = "auto", fast_abort: float | None = None,
                ordered: bool = True, star: bool = False, progress: bool = True, drain_at: float | str | None = "auto",
                drain_margin_s: float = 30.0, journal=None, key: Callable[[Any], str] | None = None,
                retry_failed: bool = False) -> MapResult:
    """Map ``fn`` over ``items``, handing out work as engines free up (best for variable task times).

    retries: re-runs of a task whose function raised (engine loss never spends them).
    walltime_s: a task running longer is killed (C calls too) and counts as a failed attempt.
    chunksize: ``"auto"`` groups short tasks, keeps long ones single; or a fixed integer.
    fast_abort: a task running longer than ``fast_abort`` x the median is aborted and rerun elsewhere.
    drain_at: epoch seconds; ``"auto"`` (default) = the batch job's end time, None = never. No task is
        handed out that would not finish ``drain_margin_s`` before it; the rest is reported in ``res.undone``.
    journal: path of an SQLite journal: finished tasks are skipped when the map is run again. The key
        is the function's module + qualname and the input, not its code: after changing what fn
        computes, use a new journal (or ``key=`` with a version).
    """
    return _map("dynamic", fn, items, client=client, retries=retries, walltime_s=walltime_s,
                chunksize=chunksize, fast_abort=fast_abort, ordered=ordered, star=star, progress=progress,
                drain_at=drain_at, drain_margin_s=drain_margin_s, journal=journal, key=key,
                retry_failed=retry_failed)


def static_map(fn: Callable, items: Iterable[Any], *, client=None, retries: int = 0,
               walltime_s: float | None = None, chunksize: int | str = "auto", fast_abort: float | None = None,
               ordered: bool = True, star: bool = False, progress: bool = True, drain_at: float | str | None = "auto",
               drain_margin_s: float = 30.0, journal=None, key: Callable[[Any], str] | None = None,
               retry_failed: bool = False) -> MapResult:
    """Map ``fn`` over ``items`` giving every engine the same share up front (best for uniform task times).

    Same arguments and result as :func:`dynamic_map`.
    """
    return _map("static", fn, items, client=client, retries=retries, walltime_s=walltime_s,
                chunksize=chunksize, fast_abort=fast_abort, ordered=ordered, star=star, progress=progress,
                drain_at=drain_at, drain_margin_s=drain_margin_s, journal=journal, key=key,
                retry_failed=retry_failed)
