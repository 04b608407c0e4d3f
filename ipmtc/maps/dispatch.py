"""The dispatcher: one map from its first input to its :class:`~.result.MapResult`.

It coordinates four parts, each the one home of its policy:

- :mod:`.placement` — chunk sizes, the window of chunks in flight, which engine
  gets the next chunk, when to stop handing out work (draining);
- :mod:`.transport` — sending a chunk (over the client's channel, or as an
  ipyparallel apply), decoding its answer, forgetting and purging it;
- :mod:`.ledger` — every task's record: inputs drawn and journal hits, retries
  charged (a task's own exceptions and walltime kills) or not (engine loss,
  straggler aborts, drains), failures, the result and the journal;
- :mod:`.supervision` — lost and new engines, stragglers, giving up.

One task's way: the ledger draws it, placement picks an engine and a chunk size,
the transport sends it and decodes the answer, the ledger settles it into the
result. Results flow one way: engines -> transport -> ledger -> result.
"""
from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import _ipp
from .hubwatch import HubWatch
from .ledger import Ledger
from .options import Options
from .placement import Placement
from .progress import Progress
from .result import MapResult
from .spec import MapSpec
from .supervision import Supervisor
from .transport import EngineGone, Transport

__all__ = ["Dispatcher", "Options"]


class Dispatcher:
    """Runs one map to completion over a connected ``ipyparallel.Client``."""

    def __init__(self, client: Any, spec: MapSpec, source: Iterator[tuple[int, Any]], n_total: int | None,
                 opts: Options, *, engines: list[int] | None = None):
        pdir = _ipp.profile_dir_of(client)
        # a view: its engines, no others; a pool's map joins that pool's newcomers (known from their notes)
        only = set(engines) if engines is not None and (opts.pool is None or not pdir) else None
        engines = list(engines if engines is not None else client.ids)
        self.bar = Progress(opts.progress, n_total, f"ipmtc {opts.schedule}")
        self.done_q: queue.SimpleQueue[str] = queue.SimpleQueue()  # msg ids of answered chunks
        self.ledger = Ledger(source, n_total, opts, len(engines), self.bar)
        self.placement = Placement(opts, engines, n_total, self.ledger.times, only)
        self.transport = Transport(client, spec, self.done_q.put)
        self.supervisor = Supervisor(self.placement, self.ledger, self.transport, opts.fast_abort,
                                     HubWatch.for_client(client), Path(pdir) if pdir else None)
        self.journal = opts.journal

    def run(self) -> MapResult:
        """Run the map to its end; the :class:`MapResult` with every task."""
        for _ in self._rounds():
            pass
        return self.ledger.res

    def stream(self) -> Iterator[Any]:
        """Run the map, yielding results as they come (``imap``): in input order, or as completed.

        With a journal, what is yielded was committed first. Ordered, a result that
        arrives early waits for those before it; nothing else is held.
        """
        ledger, ordered = self.ledger, self.ledger.opts.ordered
        held: dict[int, Any] = {}
        expect = 0
        for _ in self._rounds():
            if not ledger.ready:
                continue
            if self.journal is not None:
                self.journal.flush()  # durable before the caller sees it
            while ledger.ready:
                index, value = ledger.ready.popleft()
                if not ordered:
                    yield value
                    continue
                held[index] = value
                while expect in held:
                    yield held.pop(expect)
                    expect += 1
        for index in sorted(held):  # after tasks left undone
            yield held.pop(index)

    def _rounds(self) -> Iterator[None]:
        """The map's loop: hand out, settle answers, supervise; yields after each round."""
        self.ledger.res.started_at = time.time()
        self.bar.open()
        # with a journal, this loop commits what each round took in (_drain_completions)
        with self.journal.driven() if self.journal is not None else contextlib.nullcontext():
            try:
                self.transport.open(self.placement.engines)
                while True:
                    self._fill()
                    if not self.transport.inflight and not self.ledger.has_work():
                        break
                    self._drain_completions(timeout=0.05)
                    self._supervise()
                    yield
                yield
            finally:
                self._cleanup()

    def _cleanup(self) -> None:
        """The map's end, also on an error: nothing here may raise over the error or lose a result."""
        for step in (self.transport.close, self.ledger.close, self.transport.flush_purge):
            try:
                step()
            except Exception:  # a broken client or channel must not hide the map's results
                pass
        if self.journal is not None:
            self.journal.flush()  # never raises (a failed write is the journal's .error)
        self._refresh_bar(force=True)
        self.bar.close()

    # ------------------------------------------------------------ handing out

    def _fill(self) -> None:
        place, ledger = self.placement, self.ledger
        while place.has_room(len(self.transport.inflight), ledger.pending()):
            if place.should_drain() or place.waits_for_turn():
                return
            for target in place.candidates(ledger.pending()):
                size = place.chunk_size(ledger.remaining(), self.transport.listening())
                indices = ledger.take(size, target, place.engines, idle=place.idle(target))
                if indices:
                    place.next_turn()
                    self._submit(indices, target)
                    break
                if not ledger.redo:
                    return  # nothing left to hand out
            else:
                return  # only retries that avoid the engines with room: wait for another to free up

    def _submit(self, indices: list[int], target: int, speculative: bool = False) -> None:
        tasks = self.ledger.tasks(indices)
        try:
            chunk = self.transport.submit(indices, tasks, target, speculative)
        except EngineGone:  # the engine is gone since we last looked: back in line
            self.supervisor.look_now()
            self._supervise()
            self.ledger.back_in_line(indices)
            return
        except Exception as e:  # an input that cannot be sent fails (no retry can help), the map goes on
            bad = self.transport.unsendable(tasks) if len(indices) > 1 else indices
            self.ledger.cannot_send(bad or indices, e)
            good = [i for i in indices if i not in set(bad)] if bad else []
            if good:
                self._submit(good, target, speculative)
            return
        self.ledger.sent(indices, chunk.submitted)
        self.placement.placed(target, alone=indices[0] in self.ledger.crashes.alone)

    # ------------------------------------------------------------ answers

    def _drain_completions(self, timeout: float) -> None:
        """Settle every answered chunk, waiting up to ``timeout`` for the first; commit them to the journal."""
        try:
            mid = self.done_q.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            self._settle_answers(mid)
        finally:
            if self.journal is not None:  # the group commit: what this round took in, one write (never raises)
                self.journal.flush()

    def _settle_answers(self, mid: str) -> None:
        while True:
            answered = self.transport.complete(mid)
            if answered is not None:
                chunk, done = answered
                self.placement.released(chunk.target)
                self.ledger.settle(chunk.indices, done)
                if done.crashed:  # its engine died: out of the rotation before the next chunk is placed
                    self.supervisor.look_now()
            try:
                mid = self.done_q.get_nowait()
            except queue.Empty:
                return

    # ------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        sup = self.supervisor
        if not sup.due():
            return
        sup.track_engines()
        sup.check_controller()
        sup.check_engines_left()
        for index, eid in sup.stragglers():
            targets = self.placement.rerun_targets(eid, self.ledger.pending())
            if targets:
                self._submit([index], targets[0], speculative=True)
        if self.placement.draining and not self.transport.inflight:
            self.ledger.mark_undone()
        self._refresh_bar()

    def _refresh_bar(self, force: bool = False) -> None:
        self.bar.refresh(force, failed=len(self.ledger.res.failed), retried=self.ledger.n_retried,
                         engines=len(self.placement.engines))
