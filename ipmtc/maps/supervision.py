"""Watching a running map: engines that leave or join, stragglers, and when to give up.

Every :data:`SUPERVISE_EVERY_S` the dispatcher asks the supervisor to look. A
lost engine's unanswered chunks are taken back at once and their tasks requeued
uncharged: the hub would answer them with an ``EngineError`` only after its
registration timeout (tens of seconds with the presets), and the dispatcher knows
where each chunk went. New engines join the rotation (and are asked to listen).
With no engine left for :data:`NO_ENGINE_GRACE_S` the map ends with
:class:`~ipmtc.errors.EnginesLostError`, which carries what was computed.

A lost controller (its hub silent for :data:`.hubwatch.LOST_AFTER_S`, and no
apply answered meanwhile) never hangs a map: applies cannot answer without it,
so their chunks go back in line, and engines whose listener talks to this
process directly go on (their deaths are told by the channel itself); once no
such engine is left the map ends with :class:`~ipmtc.errors.ControllerLostError`,
which carries every result computed. With
``fast_abort``, a task running longer than that factor times the median is
aborted (SIGINT to its engine) and a second copy runs elsewhere; whichever copy
finishes first wins, the other is discarded.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import ControllerLostError, EnginesLostError
from ..notes import LeavingWatch, read_note
from ..outcomes import LEFT, LOST
from .hubwatch import LOST_AFTER_S, HubWatch
from .ledger import Ledger
from .placement import Placement
from .transport import Transport

NO_ENGINE_GRACE_S = 3.0
NOTE_WAIT_S = 10.0  # how long an engine that joined mid-map waits for its note (where it runs, its job's end)
SUPERVISE_EVERY_S = 0.1


class Supervisor:
    """Engine liveness, lost-engine rescue, straggler aborts and giving up, for one map."""

    def __init__(self, placement: Placement, ledger: Ledger, transport: Transport, fast_abort: float | None,
                 hub: HubWatch | None = None, profile_dir: Path | None = None):
        self.placement, self.ledger, self.transport = placement, ledger, transport
        # `ipmtc remove` names the engines that leave (drain) in the profile; each engine notes there where it
        # runs and its batch job's end (engines of a job ending before the map's get nothing they could not finish)
        self.profile_dir = profile_dir
        self.leaving = LeavingWatch(profile_dir) if profile_dir is not None else None
        self._unnoted: dict[int, float] = {}  # engine -> until when its note is looked for
        self.fast_abort = fast_abort
        self.hub = hub
        self.controller_lost = False
        self._last = 0.0
        self._no_engine_since: float | None = None
        self._note_engines(placement.engines, hold=False)  # the map's first engines serve at once

    def due(self) -> bool:
        """Whether it is time to look again (at most every :data:`SUPERVISE_EVERY_S`)."""
        now = time.monotonic()
        if now - self._last < SUPERVISE_EVERY_S:
            return False
        self._last = now
        return True

    def look_now(self) -> None:
        """The next :meth:`due` is: something changed (an engine left under a submission)."""
        self._last = 0.0

    def track_engines(self) -> None:
        """Follow the client's engines: rescue the chunks of the lost ones, ask the new ones to listen."""
        self._follow_leaving()
        lost, new = self.placement.track(self.transport.engine_ids())
        left = [e for e in lost if e in self.placement.leaving]
        if left:  # drained by `ipmtc remove`: not a loss; what was still queued there is handed out again
            lost = [e for e in lost if e not in self.placement.leaving]
            for eid, chunks in self.transport.rescue(set(left)).items():
                self.ledger.requeue([i for c in chunks for i in c.indices], eid, LEFT)
        if lost:
            self.ledger.res.engine_losses += len(lost)
            node_losses = self._node_losses(lost)
            for eid, chunks in self.transport.rescue(set(lost)).items():
                self.ledger.engine_died(eid, [c.indices for c in chunks], node_loss=eid in node_losses)
        if new:
            self.transport.attach(new)
        for e in lost + left:
            self._unnoted.pop(e, None)
            self.placement.holding.discard(e)
        self._note_engines(new, hold=True)

    def _note_engines(self, engines: list[int], *, hold: bool) -> None:
        """Read the notes of ``engines`` and of those still unnoted; ``hold``: keep these out until noted.

        Engines that joined mid-map wait for their note (written within a moment of registering), so an engine of
        a job about to end gets nothing first; an engine that writes none (not started by ipmtc) serves after
        :data:`NOTE_WAIT_S`.
        """
        if self.profile_dir is None:
            return
        now = time.monotonic()
        for e in engines:
            self._unnoted[e] = now + NOTE_WAIT_S
            if hold:
                self.placement.holding.add(e)
        for e, until in list(self._unnoted.items()):
            note = read_note(self.profile_dir, e)
            if note is None and now < until:
                continue
            del self._unnoted[e]
            pool = self.placement.opts.pool
            if pool is not None and e in self.placement.holding and (note or {}).get("pool") != pool:
                self.placement.drop(e)  # a newcomer of another pool (or of none we know): not this map's
                continue
            end = (note or {}).get("ends_at")
            if isinstance(end, (int, float)):
                self.placement.ends[e] = float(end)
            self.placement.holding.discard(e)

    def _follow_leaving(self) -> None:
        """Engines asked to leave get nothing more (the file is read again only when it changed)."""
        leaving = self.leaving.changed() if self.leaving is not None else None
        if leaving is not None:
            self.placement.leaving = leaving

    def _node_losses(self, lost: list[int]) -> set[int]:
        """Of ``lost`` (gone at once), the engines that went with another engine of their host: a node loss."""
        by_host: dict[str, list[int]] = {}
        for e in lost:
            host = self.ledger.hosts.get(e)
            if host is not None:
                by_host.setdefault(host, []).append(e)
        return {e for group in by_host.values() if len(group) > 1 for e in group}

    def check_controller(self) -> None:
        """Without a controller: applies go back in line, only channel engines go on; none left ends the map."""
        if self.hub is None or not self.hub.lost():
            return
        if time.monotonic() - self.transport.last_apply_answer < LOST_AFTER_S:
            return  # an apply answered lately: the controller lives (its hub is only busy)
        if not self.controller_lost:
            self.controller_lost = True
            for chunk in self.transport.take_applies():
                self.ledger.requeue(chunk.indices, chunk.target, LOST)
        able = [e for e in self.placement.engines if self.transport.listening(e)]
        if able != self.placement.engines:
            self.placement.engines = able
        outstanding = bool(self.transport.inflight) or self.ledger.has_work()
        if not able and outstanding:
            self._give_up(ControllerLostError, f"the controller is gone (silent for {self.hub.silent_s():.0f} s) "
                          "and no engine can run tasks without it")

    def check_engines_left(self) -> None:
        """Raise :class:`EnginesLostError` once no engine has been left for the grace time."""
        outstanding = bool(self.transport.inflight) or self.ledger.has_work()
        if self.placement.engines or not outstanding:
            self._no_engine_since = None
            return
        now = time.monotonic()
        self._no_engine_since = self._no_engine_since or now
        if now - self._no_engine_since > NO_ENGINE_GRACE_S:
            self._give_up(EnginesLostError, "all engines are gone")

    def stragglers(self) -> Iterator[tuple[int, int | None]]:
        """Abort each straggler; yield (task index, engine it straggled on) for its second copy.

        A generator: the caller places each copy before the next straggler is looked at.
        """
        if self.fast_abort is None or len(self.ledger.times) < max(5, len(self.placement.engines)):
            return
        limit = self.fast_abort * self.ledger.times.median()
        now = time.time()
        for mid, chunk in list(self.transport.inflight.items()):
            started = self.transport.running(mid, chunk)
            if not started:
                continue
            index, t0 = started
            if not self.ledger.may_speculate(index) or now - t0 <= limit:
                continue
            eid = self.transport.engine_of(mid, chunk)
            # abort the straggler (SIGINT: the engine's runner kills its task) and run it elsewhere
            if eid is not None:
                self.transport.interrupt(eid)
            self.ledger.straggler(index, eid, t0, now)
            yield index, eid

    def _give_up(self, kind: type[EnginesLostError | ControllerLostError] = EnginesLostError,
                 why: str = "all engines are gone") -> None:
        chunks = self.transport.abandon()
        outstanding = sorted({i for c in chunks for i in c.indices} | set(self.ledger.redo))
        res = self.ledger.give_up(outstanding)
        n_undone = len(res.undone)
        err = kind(f"{why} with {n_undone} task(s) outstanding; the {self.ledger.n_finished} results computed "
                   "are in this error's .result; restart the cluster (ipmtc stop; ipmtc start) and map the undone "
                   "tasks again (with journal=, a rerun of the same map does only those)")
        err.result = res
        raise err
