"""``static_map``, ``dynamic_map``, ``imap``: argument checks, settings resolved once, one :class:`Dispatcher`."""
from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

from ..errors import JournalError, MapError
from .dispatch import Dispatcher
from .options import Options, Schedule
from .result import MapResult, TaskFailure
from .spec import MapSpec

if TYPE_CHECKING:
    from ..journal import Journal


def _number(value: Any, name: str, *, minimum: float, integer: bool = False, none_ok: bool = False,
            strict: bool = True, what: str = "") -> None:
    """Refuse a bad number before anything is sent: one line saying what is wrong and what to give."""
    if value is None and none_ok:
        return
    kind = numbers.Integral if integer else numbers.Real
    bad = isinstance(value, bool) or not isinstance(value, kind)
    if not bad:
        v = cast(float, value)
        bad = not (v > minimum if strict else v >= minimum)
    if bad:
        raise MapError(f"{name} must be {what}, got {value!r}")


def _check(fn: Any, retries: Any, walltime_s: Any, chunksize: Any, fast_abort: Any, crash_limit: Any,
           max_rss_mb: Any) -> None:
    """Bad input is refused before anything is sent."""
    if not callable(fn):
        raise MapError(f"the function to map must be callable, got {type(fn).__name__}: {fn!r:.60}")
    _number(retries, "retries", minimum=0, integer=True, strict=False, what="an integer >= 0")
    _number(walltime_s, "walltime_s", minimum=0, none_ok=True,
            what="a number of seconds > 0 (or None for no limit)")
    if chunksize != "auto":
        _number(chunksize, "chunksize", minimum=1, integer=True, strict=False, what="'auto' or an integer >= 1")
    _number(fast_abort, "fast_abort", minimum=1, none_ok=True, what="a factor > 1 of the median task time (e.g. 3)")
    _number(crash_limit, "crash_limit", minimum=1, integer=True, none_ok=True, strict=False,
            what="an integer >= 1 (engines a task may take down before it fails), or None for the preset's")
    _number(max_rss_mb, "max_rss_mb", minimum=0, none_ok=True,
            what="a number of megabytes > 0 (or None for no limit)")
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


_POOLS: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()  # client -> engine -> pool
POOL_ASK_TIMEOUT_S = 30.0


def _pool_of() -> str:
    """Run on an engine: the pool ``ipmtc start`` put it in."""
    import os

    return os.environ.get("IPMTC_POOL", "default")


def _pool_engines(rc: Any, pool: str, ids: list[int] | None) -> list[int]:
    """The engines of ``pool`` among ``ids`` (all: None); each engine is asked once per client."""
    if not isinstance(pool, str) or not pool:
        raise MapError(f"pool must be the name of an engine pool (a string), got {pool!r}")
    candidates = list(rc.ids) if ids is None else ids
    known = _POOLS.setdefault(rc, {})
    ask = [i for i in candidates if i not in known]
    if ask:
        try:
            known.update(zip(ask, rc[ask].apply_async(_pool_of).get(timeout=POOL_ASK_TIMEOUT_S)))
        except Exception as e:
            raise MapError(f"could not ask engines {ask[:8]} for their pool ({type(e).__name__}); they may be "
                           "busy with another map: try again when it ended") from None
    members = [i for i in candidates if known.get(i) == pool]
    if not members:
        names = ", ".join(sorted(set(known[i] for i in candidates if i in known))) or "none"
        raise MapError(f"no engine of pool {pool!r} in this cluster (its pools: {names}); start one with "
                       f"`ipmtc start --pool {pool}:...` or leave pool= out")
    return members


def _source(items: Iterable[Any]):
    return iter(enumerate(items))


def _open_journal(journal: Any, fn: Callable, retry_failed: bool) -> Journal:
    """The journal to record into: the one given (checked against ``fn``) or one opened at a path."""
    from ..journal import Journal

    if isinstance(journal, Journal):
        journal.check_function(fn)  # a journal of another function is refused too
        return journal
    return Journal.open(journal, fn=fn, retry_failed=retry_failed)


@dataclass(frozen=True)
class MapArgs:
    """The user's arguments of one map, as given (checked by :func:`_check`)."""

    client: Any = None
    retries: int = 0
    walltime_s: float | None = None
    chunksize: int | str = "auto"
    fast_abort: float | None = None
    ordered: bool = True
    star: bool = False
    progress: bool = True
    drain_at: float | str | None = "auto"
    drain_margin_s: float = 30.0
    journal: Any = None
    key: Callable[[Any], str] | None = None
    retry_failed: bool = False
    crash_limit: int | None = None
    max_rss_mb: float | None = None
    pool: str | None = None


def _crash_limit(given: int | None) -> int:
    """The map's argument, else the preset's (``IPMTC_CRASH_LIMIT``, ``IPMTC_PRESET``, built-in)."""
    if given is not None:
        return int(given)
    from ..presets import resolve

    return int(resolve().preset.crash_limit)


def _settings(schedule: Schedule, fn: Callable, a: MapArgs, journal: Journal | None,
              stream: bool) -> tuple[MapSpec, Options]:
    """The user's arguments (checked) resolved once: what engines run with, what the dispatcher does."""
    drain_at = a.drain_at
    if drain_at == "auto":  # inside a batch job: its end time, so nothing is lost to the kill
        from ..allocation import job_end_time

        drain_at = job_end_time()
    journal_prefix, key = None, None
    if journal is not None:
        from ..keys import key_function, key_prefix

        if a.key is None:  # the default key is worked out on the engines, with the task
            journal_prefix = key_prefix(fn)
        key = a.key or key_function(fn)  # the function's identity, worked out once
    spec = MapSpec(fn, star=a.star, walltime_s=a.walltime_s,
                   isolate=a.walltime_s is not None or a.fast_abort is not None,
                   publish_start=a.fast_abort is not None, journal_prefix=journal_prefix,
                   max_rss_mb=a.max_rss_mb)
    opts = Options(schedule=schedule, retries=int(a.retries), fast_abort=a.fast_abort,
                   chunksize="auto" if a.chunksize == "auto" else int(a.chunksize), ordered=a.ordered,
                   progress=a.progress, drain_at=cast("float | None", drain_at), drain_margin_s=a.drain_margin_s,
                   journal=journal, key=key, crash_limit=_crash_limit(a.crash_limit), stream=stream)
    return spec, opts


def _prepare(schedule: Schedule, fn: Callable, items: Any, a: MapArgs,
             stream: bool) -> tuple[Any, list[int] | None, Any, int | None, Journal | None, MapSpec, Options]:
    """Everything a map needs, every argument checked, before anything is sent."""
    _check(fn, a.retries, a.walltime_s, a.chunksize, a.fast_abort, a.crash_limit, a.max_rss_mb)
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
    rc, engines = _client_and_views(a.client)
    if not rc.ids:
        raise MapError("the cluster has no engines; start some with `ipmtc start` and try again")
    whole = engines is None  # the whole cluster, not a view: engines that join later may take part
    if a.pool is not None:
        engines = _pool_engines(rc, a.pool, engines)
    jr = None if a.journal is None else _open_journal(a.journal, fn, a.retry_failed)
    try:
        spec, opts = _settings(schedule, fn, a, jr, stream)
        if a.pool is not None and whole:
            opts = replace(opts, pool=a.pool)
    except BaseException:
        if jr is not None and jr is not a.journal:
            jr.close()
        raise
    return rc, engines, iterator, n_total, jr, spec, opts


def _journal_error(jr: Journal | None, res: MapResult) -> None:
    if jr is not None and jr.error is not None:  # e.g. disk full mid-map: say so, lose nothing
        err = JournalError(f"{jr.error}; the results of this map are in this error's .result")
        err.result = res
        raise err


def _map(schedule: Schedule, fn: Callable, items: Any, a: MapArgs) -> MapResult:
    rc, engines, iterator, n_total, jr, spec, opts = _prepare(schedule, fn, items, a, stream=False)
    try:
        res = Dispatcher(rc, spec, iterator, n_total, opts, engines=engines).run()
        if a.pool is not None:  # said wherever the map is summarized (summary(), save(), ipmtc report)
            res.schedule = f"{res.schedule}, pool {a.pool}"
    finally:
        if jr is not None and jr is not a.journal:
            jr.close()  # never raises; releases the lock whatever happened
    _journal_error(jr, res)
    return res


class MapStream:
    """The results of :func:`imap` as they come; after the last one, the map's summary and failures.

    Nothing of a finished task is kept: bookkeeping stays O(tasks unfinished), however many
    tasks the input yields. A failed task comes as its :class:`~.result.TaskFailure`.
    """

    def __init__(self, gen: Iterator[Any], dispatcher: Dispatcher):
        self._gen = gen
        self._dispatcher = dispatcher

    def __iter__(self) -> Iterator[Any]:
        return self._gen

    def __next__(self) -> Any:
        return next(self._gen)

    @property
    def failed(self) -> list[TaskFailure]:
        return self._dispatcher.ledger.res.failed

    @property
    def undone(self) -> list[int]:
        return self._dispatcher.ledger.res.undone

    def summary(self) -> dict[str, Any]:
        """Tasks, failures, retries, crashes, engine losses so far (all of them once iteration ended)."""
        ledger = self._dispatcher.ledger
        res = ledger.res
        st = ledger.tally.stats().as_dict()
        return {"schedule": res.schedule, **st, "from_journal": res.journal_hits,
                "engine_losses": res.engine_losses, "engines": res.n_engines}


def _stream(schedule: Schedule, fn: Callable, items: Any, a: MapArgs) -> MapStream:
    rc, engines, iterator, n_total, jr, spec, opts = _prepare(schedule, fn, items, a, stream=True)
    dispatcher = Dispatcher(rc, spec, iterator, n_total, opts, engines=engines)

    def results() -> Iterator[Any]:
        try:
            yield from dispatcher.stream()
        finally:
            if jr is not None and jr is not a.journal:
                jr.close()
        _journal_error(jr, dispatcher.ledger.res)

    return MapStream(results(), dispatcher)


_COMMON_DOC = """
    retries: re-runs of a task whose function raised (engine loss never spends them).
    walltime_s: a task running longer is killed, with every process it started (C calls too), and
        counts as a failed attempt.
    max_rss_mb: a task whose processes' resident memory grows past this is killed like a walltime
        (the engine stays in service) and counts as a failed attempt (``MemoryExceeded``).
    crash_limit: engines a task may take down (an OOM kill, a segfault) before it fails as
        ``EngineCrashes``; its chunk's other tasks are rerun one by one and never charged. None: the
        preset's (``IPMTC_CRASH_LIMIT``; default 3).
    chunksize: ``"auto"`` groups short tasks, keeps long ones single; or a fixed integer.
    fast_abort: a task running longer than ``fast_abort`` x the median is aborted and rerun elsewhere.
    drain_at: epoch seconds; ``"auto"`` (default) = the batch job's end time, None = never. No task is
        handed out that would not finish ``drain_margin_s`` before it; the rest is reported in ``res.undone``.
    pool: run only on the engines of this pool (``ipmtc start --pool NAME:...``); None: on every engine.
    journal: path of an SQLite journal: finished tasks are skipped when the map is run again. The key
        is the function's module + qualname and the input, not its code: after changing what fn
        computes, use a new journal (or ``key=`` with a version).
"""


def dynamic_map(fn: Callable, items: Iterable[Any], *, client=None, retries: int = 0,
                walltime_s: float | None = None, chunksize: int | str = "auto", fast_abort: float | None = None,
                ordered: bool = True, star: bool = False, progress: bool = True, drain_at: float | str | None = "auto",
                drain_margin_s: float = 30.0, journal=None, key: Callable[[Any], str] | None = None,
                retry_failed: bool = False, crash_limit: int | None = None,
                max_rss_mb: float | None = None, pool: str | None = None) -> MapResult:
    return _map("dynamic", fn, items, MapArgs(
        client, retries, walltime_s, chunksize, fast_abort, ordered, star, progress, drain_at, drain_margin_s,
        journal, key, retry_failed, crash_limit, max_rss_mb, pool))


def static_map(fn: Callable, items: Iterable[Any], *, client=None, retries: int = 0,
               walltime_s: float | None = None, chunksize: int | str = "auto", fast_abort: float | None = None,
               ordered: bool = True, star: bool = False, progress: bool = True, drain_at: float | str | None = "auto",
               drain_margin_s: float = 30.0, journal=None, key: Callable[[Any], str] | None = None,
               retry_failed: bool = False, crash_limit: int | None = None,
               max_rss_mb: float | None = None, pool: str | None = None) -> MapResult:
    return _map("static", fn, items, MapArgs(
        client, retries, walltime_s, chunksize, fast_abort, ordered, star, progress, drain_at, drain_margin_s,
        journal, key, retry_failed, crash_limit, max_rss_mb, pool))


def imap(fn: Callable, items: Iterable[Any], *, client=None, retries: int = 0,
         walltime_s: float | None = None, chunksize: int | str = "auto", fast_abort: float | None = None,
         ordered: bool = True, star: bool = False, progress: bool = True, drain_at: float | str | None = "auto",
         drain_margin_s: float = 30.0, journal=None, key: Callable[[Any], str] | None = None,
         retry_failed: bool = False, crash_limit: int | None = None,
         max_rss_mb: float | None = None, pool: str | None = None) -> MapStream:
    return _stream("dynamic", fn, items, MapArgs(
        client, retries, walltime_s, chunksize, fast_abort, ordered, star, progress, drain_at, drain_margin_s,
        journal, key, retry_failed, crash_limit, max_rss_mb, pool))


dynamic_map.__doc__ = """Map ``fn`` over ``items``, handing out work as engines free up (best for variable task times).
""" + _COMMON_DOC
static_map.__doc__ = """Map ``fn`` over ``items`` giving every engine the same share up front (uniform task times).

    Same arguments and result as :func:`dynamic_map`.
""" + _COMMON_DOC
imap.__doc__ = """Like :func:`dynamic_map`, but results are yielded as the map runs (in input order, or as they
    complete with ``ordered=False``), and nothing of a finished task is kept: memory stays flat in the
    number of tasks (ordered iteration holds only results that arrive early). With a journal, a result
    is committed before it is yielded. Failed tasks come as their ``TaskFailure``; after the last
    result, the stream's ``.failed``, ``.undone`` and ``.summary()`` tell the rest.
""" + _COMMON_DOC
