"""The dispatcher: the single place for map policy.

Chunk sizing, a bounded window of chunks in flight, the retry ledger (a task's
own exceptions and walltime kills spend its retries; engine loss, straggler
aborts and drains do not), reaction to engine loss, straggler supervision,
walltime-aware draining, purging handed-back results, journal writes and
progress. Results flow one way: engines -> dispatcher -> :class:`MapResult`.

Both schedules place every chunk on a chosen engine over a direct view, so the
dispatcher always knows where each chunk is (an engine's loss requeues its chunks
at once) and no task waits in the controller's scheduler. They differ in how:
``static`` deals chunks round-robin to fixed engines (each engine its fair share;
a known-length input goes out as one message per engine); ``dynamic`` keeps at
most two chunks on each engine (one running, one waiting there, so an engine
never idles for a round trip) and sends the next one to whichever engine has
the fewest. Measured here (weak scaling, 0.3 s tasks, 32 engines on 2 cores),
this beat submitting to the load-balanced view with hwm=1, which costs a
scheduler round trip per chunk and a burst of all tasks at once.

Chunks travel over the client's :class:`~.channel.Channel` where they can: a
listener on each engine takes them straight from this process, without
ipyparallel's per-apply cost (weak scaling at 32 engines: dynamic 0.89 -> 0.95,
static 0.93 -> 0.95). Engines whose listener cannot reach this process get plain
applies; a chunk whose listener went away goes back in line, uncharged.
"""
from __future__ import annotations

import math
import pickle
import queue
import signal
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ipyparallel.error import NoEnginesRegistered

from .. import _ipp
from ..errors import EnginesLostError
from . import runner
from .channel import ATTACH, Channel, ChannelResult
from .progress import Progress
from .result import LOST, OK, RAISED, UNDONE, WALLTIME, MapResult, TaskFailure, TaskRecord

TARGET_CHUNK_S = 1.0  # a chunk this long makes per-message cost (~5-10 ms CPU here) about 1%
CHANNEL_CHUNK_S = 0.1  # over the channel a chunk costs ~1 ms (both ends): 0.1 s keeps that ~1%
MAX_CHUNK = 10_000  # bounds message size and the work lost with one engine
STATIC_WINDOW_PER_ENGINE = 2
DYNAMIC_WINDOW_PER_ENGINE = 2  # one running + one waiting on the engine hides the round trip
NO_ENGINE_GRACE_S = 3.0
PURGE_EVERY = 256  # hub/client purges are batched
_LATE_PURGE: deque[str] = deque()  # attach replies, not waited for: purged from the hub with the next flush


@dataclass
class _Chunk:
    indices: list[int]
    target: int | None
    submitted: float
    ar: Any = None
    speculative: bool = False


@dataclass
class Options:
    schedule: str = "dynamic"
    retries: int = 0
    walltime_s: float | None = None
    fast_abort: float | None = None
    chunksize: int | str = "auto"
    ordered: bool = True
    star: bool = False
    progress: bool = True
    drain_at: float | None = None  # epoch: hand out no task that would end after this
    drain_margin_s: float = 30.0
    key: Callable[[Any], str] | None = None
    key_prefix: bytes | None = None  # engines key the tasks and pickle the results for the journal
    journal: Any = None


def _sendable(item: Any) -> bool:
    from ipyparallel.serialize import serialize_object

    try:
        serialize_object(item)
        return True
    except Exception:
        return False


class Dispatcher:
    """Runs one map to completion over a connected ``ipyparallel.Client``."""

    def __init__(self, client, fn: Callable, source: Iterator[tuple[int, Any]], n_total: int | None,
                 opts: Options, *, engines: list[int] | None = None):
        self.client, self.fn, self.opts = client, fn, opts
        self.source, self.n_total = source, n_total
        # look tasks up (and key them before they run) only in a journal that holds some
        self.lookups = opts.journal is not None and opts.key is not None and opts.journal.has_records
        self.journal_prefix = opts.key_prefix if opts.journal is not None else None
        self.source_done = False
        self.n_taken = 0  # inputs drawn from the source so far
        self.static = opts.schedule == "static"
        self.engines: list[int] = list(engines if engines is not None else client.ids)
        self.known_engines = set(self.engines)
        self.items: dict[int, Any] = {}  # inputs of tasks not finished yet (needed to resubmit)
        self.records: dict[int, TaskRecord] = {}
        self.redo: deque[int] = deque()
        self.avoid: dict[int, set[int]] = {}
        self.inflight: dict[str, _Chunk] = {}
        self.per_engine: dict[int, int] = {}
        self.rot = 0
        self.done_q: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.res = MapResult(ordered=opts.ordered, n_engines=len(self.engines), schedule=opts.schedule)
        self.finished: set[int] = set()
        self.speculated: set[int] = set()
        self.rescued: set[str] = set()
        self.durations: deque[float] = deque(maxlen=2000)
        self.mean_task_s: float | None = None
        self.to_purge: list[str] = []
        self.no_engine_since: float | None = None
        self.draining = False
        self.isolate = opts.walltime_s is not None or opts.fast_abort is not None
        self.bar = Progress(opts.progress, n_total, f"ipmtc {opts.schedule}")
        self.n_retried = 0
        self._last_supervise = 0.0
        self.channel: Channel | None = None
        self.map_id = ""

    # ------------------------------------------------------------ main loop

    def run(self) -> MapResult:
        self.res.started_at = time.time()
        self.bar.open()
        try:
            self._open_channel()
            while True:
                self._fill()
                if not self.inflight and not self.redo and self.source_done:
                    break
                try:
                    mid = self.done_q.get(timeout=0.05)
                except queue.Empty:
                    mid = None
                while mid is not None:
                    self._completed(mid)
                    try:
                        mid = self.done_q.get_nowait()
                    except queue.Empty:
                        mid = None
                self._supervise()
        finally:
            self._close_channel()
            self.res.finished_at = time.time()
            self._flush_purge()
            if self.opts.journal is not None:
                self.opts.journal.flush()
            self._refresh_bar(force=True)
            self.bar.close()
            self.res.records = [self.records[i] for i in sorted(self.records)]
        return self.res

    # ------------------------------------------------------------ the channel

    def _open_channel(self) -> None:
        ch = Channel.for_client(self.client)
        if ch is None:
            return
        try:
            self.map_id = ch.begin_map((self.fn, self.opts.star, self.opts.walltime_s, self.isolate,
                                        self.opts.fast_abort is not None, self.journal_prefix))
        except Exception:  # something plain applies can send and the channel cannot: use applies
            return
        self.channel = ch
        self._attach([e for e in self.engines if e not in ch.asked])

    def _attach(self, engines: list[int]) -> None:
        """Ask engines (once per client) to listen; one apply for all, answered at once."""
        if not engines or self.channel is None:
            return
        try:
            ar = self.client[engines].apply_async(ATTACH, self.channel.address, self.channel.nonce)
        except (IndexError, NoEnginesRegistered):
            return  # one is gone already: supervision notices, the next map asks the others
        self.channel.asked.update(engines)
        ar.add_done_callback(lambda f: _LATE_PURGE.extend(ar.msg_ids))  # nothing to wait for

    def _listening(self, engine: int | None = None) -> bool:
        ch = self.channel
        if ch is None:
            return False
        return ch.listening(engine) if engine is not None else bool(ch.connected)

    def _close_channel(self) -> None:
        if self.channel is None:
            return
        self.channel.end_map(self.map_id)
        for mid in list(self.inflight):  # an aborted map's chunks: their late answers are not kept
            self.channel.forget(mid)

    # ------------------------------------------------------------ submission

    def _chunk_size(self) -> int:
        cs = self.opts.chunksize
        n_eng = max(1, len(self.engines))
        if cs != "auto":
            return int(cs)
        if self.static:
            if self.n_total is not None:  # fair share: one message per engine when it fits
                return max(1, min(MAX_CHUNK, math.ceil(self.n_total / n_eng)))
            return 1000
        if self.mean_task_s is None:
            return 1  # probe: learn task times before grouping
        target_s = CHANNEL_CHUNK_S if self._listening() else TARGET_CHUNK_S
        size = target_s / max(self.mean_task_s, 1e-7)
        if self.n_total is not None:  # guided: shrink toward the end so engines finish together
            remaining = self.n_total - len(self.finished)
            size = min(size, remaining / (4 * n_eng))
        return max(1, min(MAX_CHUNK, int(size)))

    def _take(self, n: int, target: int) -> list[int]:
        out: list[int] = []
        passed: list[int] = []
        while self.redo and len(out) < n:
            i = self.redo.popleft()
            avoid = self.avoid.get(i)
            # a retry runs elsewhere than where it failed, while another live engine exists
            if avoid and target in avoid and any(e not in avoid for e in self.engines):
                passed.append(i)
            else:
                out.append(i)
        self.redo.extendleft(reversed(passed))
        while not self.source_done and len(out) < n:
            try:
                index, item = next(self.source)
            except StopIteration:
                self.source_done = True
                break
            self.n_taken += 1
            self.items[index] = item
            rec = self.records[index] = TaskRecord(index=index)
            if self.lookups:  # keys for recording only are worked out by the journal's writer
                rec.key = self.opts.key(item)
                hit = self.opts.journal.lookup(rec.key)
                if hit is not None:
                    self._from_journal(index, rec, hit)
                    continue
            out.append(index)
        return out

    def _from_journal(self, index: int, rec: TaskRecord, hit: Any) -> None:
        value, stored = hit
        for k in ("engine_id", "host", "pid", "started", "finished", "attempts", "outcome", "error"):
            if k in stored:
                setattr(rec, k, stored[k])
        self.finished.add(index)
        self.res.journal_hits += 1
        if rec.outcome == OK:
            self.items.pop(index, None)
            self.res._set(index, value)
            self.bar.tick()
        else:
            ename, _, evalue = (rec.error or "Error: ").partition(": ")
            self._fail(index, rec, {"ename": ename, "evalue": evalue, "traceback": ""}, record=False)

    def _should_drain(self) -> bool:
        if self.opts.drain_at is None:
            return False
        if not self.draining:
            est = statistics.median(self.durations) if self.durations else 0.0
            if time.time() + est + self.opts.drain_margin_s > self.opts.drain_at:
                self.draining = True
        return self.draining

    def _window(self) -> int:
        if self.static:
            return STATIC_WINDOW_PER_ENGINE
        if self.n_total is not None and self.n_total - self.n_taken + len(self.redo) < len(self.engines):
            # the tail: a chunk queued behind a running one could not move to the engine that
            # frees up first; one at a time lets the last tasks go where an engine is idle
            return 1
        return DYNAMIC_WINDOW_PER_ENGINE

    def _candidates(self, exclude: int | None = None) -> list[int]:
        """Engines with room, in placement order: rotation (static) or least loaded first (dynamic)."""
        window = self._window()
        n_eng = len(self.engines)
        order = [self.engines[(self.rot + k) % n_eng] for k in range(n_eng)]
        room = [e for e in order if self.per_engine.get(e, 0) < window and e != exclude]
        if not self.static:
            room.sort(key=lambda e: self.per_engine.get(e, 0))  # stable: rotation breaks ties
        return room

    def _fill(self) -> None:
        while self.engines and len(self.inflight) < self._window() * len(self.engines):
            if self._should_drain():
                return
            if self.static and self.per_engine.get(self.engines[self.rot % len(self.engines)], 0) \
                    >= STATIC_WINDOW_PER_ENGINE:
                return  # the fixed deal waits for this engine's turn
            for target in self._candidates():
                indices = self._take(self._chunk_size(), target)
                if indices:
                    self.rot += 1
                    self._submit(indices, target)
                    break
                if not self.redo:
                    return  # nothing left to hand out
            else:
                return  # only retries that avoid the engines with room: wait for another to free up

    def _submit(self, indices: list[int], target: int, speculative: bool = False) -> None:
        tasks = [(i, self.items[i]) for i in indices]
        now = time.time()
        try:
            ar = None
            if self._listening(target):
                try:
                    ar = self.channel.submit(target, self.map_id, tasks)
                except Exception:  # an input the channel cannot serialize: ipyparallel says why below
                    ar = None
            if ar is None:
                ar = self.client[target].apply_async(
                    runner.RUN_CHUNK, self.fn, tasks, self.opts.star, self.opts.walltime_s, self.isolate,
                    self.opts.fast_abort is not None, self.journal_prefix)
        except (IndexError, NoEnginesRegistered):  # the engine is gone since we last looked: back in line
            self._last_supervise = 0.0
            self._supervise()
            self.redo.extendleft(reversed(indices))
            return
        except Exception as e:  # an input that cannot be sent fails (no retry can help), the map goes on
            bad = [i for i in indices if not _sendable(self.items[i])] if len(indices) > 1 else indices
            err = {"ename": type(e).__name__, "evalue": f"task input cannot be sent to the engines: {e}",
                   "traceback": ""}
            for i in bad or indices:
                rec = self.records[i]
                rec.attempts, rec.outcome, rec.error = 1, RAISED, f"{err['ename']}: {err['evalue']}"
                rec.history.append((None, None, now, now, RAISED))
                self._fail(i, rec, err)
            good = [i for i in indices if i not in set(bad)] if bad else []
            if good:
                self._submit(good, target, speculative)
            return
        chunk = _Chunk(indices, target, now, ar, speculative)
        for i in indices:
            self.records[i].submitted = now
        mid = ar.msg_ids[0]
        self.inflight[mid] = chunk
        self.per_engine[target] = self.per_engine.get(target, 0) + 1
        ar.add_done_callback(lambda _f, mid=mid: self.done_q.put(mid))

    # ------------------------------------------------------------ completion

    def _completed(self, mid: str) -> None:
        chunk = self.inflight.pop(mid, None)
        if chunk is None:
            if mid in self.rescued:  # its tasks were resubmitted when the engine was lost
                self.rescued.discard(mid)
                self._forget(mid)
            return
        self._release(chunk)
        ar = chunk.ar
        eid = self._engine_of(mid, chunk)
        try:
            node, pid, rows, for_journal = ar.get(timeout=0)
        except Exception as e:
            ename = getattr(e, "ename", type(e).__name__)
            if ename in ("EngineError", "ImpossibleDependency", "UnmetDependency", "TaskAborted", "ChannelLost"):
                self._requeue(chunk.indices, eid, LOST)
            else:  # the chunk could not run at all (e.g. the function cannot be unpickled there)
                err = {"ename": ename, "evalue": str(getattr(e, "evalue", e)),
                       "traceback": getattr(e, "traceback", "") or ""}
                now = time.time()
                for i in chunk.indices:
                    self._charge(i, err, eid, None, None, now, now, RAISED)
            self._forget(mid)
            return
        self._forget(mid)
        # with a journal, the engine sent the ok tasks apart: (key, index, started, finished, result)
        # in one pickle, ready to store; ``rows`` has the rest
        entries = pickle.loads(for_journal) if for_journal else ()
        skip: list[int] = []  # of those: entries not to record (a duplicate that lost the race)
        over: dict[int, tuple[int, int]] = {}  # (attempts, resubmits) where not (1, 0)
        for _, index, started, finished, value in entries:
            if index in self.finished:
                skip.append(index)
                continue
            rec = self._ok(index, value, eid, node, pid, started, finished)
            if rec.attempts != 1 or rec.resubmits:
                over[index] = (rec.attempts, rec.resubmits)
        for index, status, payload, started, finished in rows:
            if index in self.finished:
                continue  # a speculative duplicate lost the race: discard it
            if status == runner.OK:
                item = self.items.get(index)
                rec = self._ok(index, payload, eid, node, pid, started, finished)
                if self.opts.journal is not None:
                    self.opts.journal.add(rec, payload, item, self.opts.key)
            elif status in (runner.RAISED, runner.WALLTIME):
                self._charge(index, payload, eid, node, pid, started, finished,
                             WALLTIME if status == runner.WALLTIME else RAISED)
            else:  # aborted straggler / not run: back in line, uncharged
                if status == runner.ABORTED and index in self.speculated:
                    continue  # its duplicate is already running elsewhere
                self._requeue([index], eid, status)
        if entries and self.opts.journal is not None:
            self.opts.journal.add_chunk(for_journal, len(entries) - len(skip), eid, node, pid, skip, over)

    def _ok(self, index: int, value: Any, eid, node, pid, started: float, finished: float) -> TaskRecord:
        rec = self.records[index]
        rec.engine_id, rec.host, rec.pid = eid, node, pid
        rec.started, rec.finished = started, finished
        rec.attempts += 1
        rec.outcome, rec.error = OK, None
        self.finished.add(index)
        self.items.pop(index, None)
        self.res._set(index, value)
        self._learn(finished - started)
        self.bar.tick()
        return rec

    def _release(self, chunk: _Chunk) -> None:
        if chunk.target in self.per_engine:
            self.per_engine[chunk.target] -= 1

    def _engine_of(self, mid: str, chunk: _Chunk) -> int | None:
        eid = _ipp.engine_of_reply(self.client, mid, chunk.ar)
        return eid if eid is not None else chunk.target

    def _learn(self, duration: float) -> None:
        self.durations.append(duration)
        self.mean_task_s = duration if self.mean_task_s is None else 0.9 * self.mean_task_s + 0.1 * duration

    def _charge(self, index: int, err: dict, eid, node, pid, started, finished, outcome: str) -> None:
        """A task's own failure: spend one of its retries, or fail it for good."""
        rec = self.records[index]
        rec.attempts += 1
        rec.history.append((eid, node, started, finished, outcome))
        rec.engine_id, rec.host, rec.pid, rec.started, rec.finished = eid, node, pid, started, finished
        rec.error = f"{err.get('ename')}: {err.get('evalue')}"
        if rec.attempts <= self.opts.retries:
            self.n_retried += 1
            if eid is not None:
                self.avoid.setdefault(index, set()).add(eid)
            self.redo.append(index)
            return
        rec.outcome = outcome
        self._fail(index, rec, err)

    def _fail(self, index: int, rec: TaskRecord, err: dict, record: bool = True) -> None:
        failure = TaskFailure(index=index, item=self.items.pop(index, None), ename=err.get("ename", ""),
                              evalue=err.get("evalue", ""), traceback=err.get("traceback", ""),
                              engine_id=rec.engine_id, host=rec.host, attempts=rec.attempts)
        self.finished.add(index)
        self.res.failed.append(failure)
        self.res._set(index, failure)
        if record and self.opts.journal is not None:
            self.opts.journal.add(rec, None, failure.item, self.opts.key)
        self.bar.tick()

    def _requeue(self, indices: list[int], eid, why: str) -> None:
        """Run again without spending retries (engine lost, straggler aborted, not run)."""
        for i in indices:
            if i in self.finished:
                continue
            rec = self.records[i]
            rec.resubmits += 1
            rec.history.append((eid, None, None, None, why))
            self.redo.appendleft(i)

    def _forget(self, mid: str) -> None:
        """Drop the client's copy of a handed-back result; bounded memory for a million tasks."""
        if self.channel is not None and mid in self.channel.results:
            self.channel.forget(mid)  # never went through ipyparallel
            return
        _ipp.forget_result(self.client, mid)
        self.to_purge.append(mid)
        if len(self.to_purge) >= PURGE_EVERY:
            self._flush_purge()

    def _flush_purge(self) -> None:
        while _LATE_PURGE:
            self.to_purge.append(_LATE_PURGE.popleft())
        if not self.to_purge:
            return
        ids, self.to_purge = self.to_purge, []
        try:
            # sent without waiting for the hub's answer: a blocking purge would hold the map
            # for a hub round trip each time, the last one inside every map's wall time
            _ipp.purge_hub_nowait(self.client, ids)
        except Exception:  # NoDB keeps nothing to purge; a busy hub is not worth failing for
            pass

    # ------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        now = time.monotonic()
        if now - self._last_supervise < 0.1:
            return
        self._last_supervise = now
        ids = list(self.client.ids)
        alive = set(ids)
        lost = [e for e in self.engines if e not in alive]
        if lost:
            self.res.engine_losses += len(lost)
            self.engines = [e for e in self.engines if e in alive]
            self._rescue_lost(set(lost))
        new = [e for e in ids if e not in self.known_engines]
        if new:  # replacements (or late starters) join the rotation
            self.known_engines.update(new)
            self.engines += new
            self._attach(new)
        if not self.engines and (self.inflight or self.redo or not self.source_done):
            self.no_engine_since = self.no_engine_since or now
            if now - self.no_engine_since > NO_ENGINE_GRACE_S:
                self._give_up()
        else:
            self.no_engine_since = None
        if self.opts.fast_abort is not None:
            self._stragglers()
        if self.draining and not self.inflight:
            self._mark_undone()
        self._refresh_bar()

    def _refresh_bar(self, force: bool = False) -> None:
        self.bar.refresh(force, failed=len(self.res.failed), retried=self.n_retried, engines=len(self.engines))

    def _rescue_lost(self, lost: set[int]) -> None:
        """Resubmit at once (free) what was placed on lost engines.

        The hub answers a lost engine's messages with an EngineError only after its
        registration timeout (tens of seconds with the presets); the dispatcher knows
        where each chunk went and need not wait. A chunk whose engine was only
        unregistered, not dead, may still answer: the first result wins, the other
        is dropped.
        """
        for e in lost:
            self.per_engine.pop(e, None)
            if self.channel is not None:
                self.channel.drop_engine(e)
        for mid, chunk in list(self.inflight.items()):
            if chunk.target in lost and not chunk.ar.ready():
                self.inflight.pop(mid)
                self.rescued.add(mid)
                self._requeue(chunk.indices, chunk.target, LOST)
                if self.channel is not None:
                    self.channel.forget(mid)  # a dead engine's listener never answers

    def _stragglers(self) -> None:
        if len(self.durations) < max(5, len(self.engines)):
            return
        limit = self.opts.fast_abort * statistics.median(self.durations)
        now = time.time()
        for mid, chunk in list(self.inflight.items()):
            if isinstance(chunk.ar, ChannelResult):  # told over the channel
                started = chunk.ar.task_started
            else:
                md = self.client.metadata.get(mid)
                started = md.get("data", {}).get("ipmtc_started") if md else None
            if not started:
                continue
            index, t0 = started
            if index in self.speculated or index in self.finished or now - t0 <= limit:
                continue
            self.speculated.add(index)
            eid = self._engine_of(mid, chunk)
            # abort the straggler (SIGINT: the engine's runner kills its task) and run it elsewhere;
            # whichever copy finishes first wins, the other is discarded
            if eid is not None:
                try:
                    self.client.send_signal(signal.SIGINT, targets=[eid], block=False)
                except Exception:
                    pass
                self.avoid.setdefault(index, set()).add(eid)
            rec = self.records[index]
            rec.resubmits += 1
            rec.history.append((eid, None, t0, now, "straggler"))
            targets = self._candidates(exclude=eid) or [e for e in self.engines if e != eid]
            if targets:
                target = targets[0]
                self._submit([index], target, speculative=True)

    def _mark_undone(self) -> None:
        """Allocation ending: what was not handed out is reported, not lost."""
        undone = list(self.redo)
        self.redo.clear()
        if not self.source_done:
            for index, item in self.source:
                self.records[index] = TaskRecord(index=index)
                undone.append(index)
            self.source_done = True
        for i in undone:
            self.records[i].outcome = UNDONE
            self.items.pop(i, None)
        self.res.undone.extend(sorted(undone))

    def _give_up(self) -> None:
        outstanding = sorted({i for c in self.inflight.values() for i in c.indices} | set(self.redo))
        for mid in list(self.inflight):
            self.inflight.pop(mid)
            if self.channel is not None:
                self.channel.forget(mid)
        self.redo.clear()
        self._mark_undone_list(outstanding)
        self.res.records = [self.records[i] for i in sorted(self.records)]
        self.res.finished_at = time.time()
        err = EnginesLostError(
            f"all engines are gone with {len(self.res.undone)} task(s) outstanding; "
            f"{len(self.res)} results are kept in this error's .result; restart the cluster "
            "(ipmtc stop; ipmtc start) and map the undone tasks again")
        err.result = self.res
        raise err

    def _mark_undone_list(self, indices: list[int]) -> None:
        for i in indices:
            if i not in self.finished:
                self.records[i].outcome = UNDONE
                self.res.undone.append(i)
        self._mark_undone()
