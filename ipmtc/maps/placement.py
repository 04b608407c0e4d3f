"""Where and how much: chunk sizes, the window of chunks in flight, which engine gets the next chunk.

Both schedules place every chunk on a chosen engine, so the dispatcher always
knows where each chunk is (an engine's loss requeues its chunks at once) and no
task waits in the controller's scheduler. They differ in how: ``static`` deals
chunks round-robin to fixed engines (each engine its fair share; a known-length
input goes out as one message per engine); ``dynamic`` keeps at most two chunks on
each engine (one running, one waiting there, so an engine never idles for a round
trip) and sends the next one to whichever engine has the fewest. Measured here
(weak scaling, 0.3 s tasks, 32 engines on 2 cores), this beat submitting to the
load-balanced view with hwm=1, which costs a scheduler round trip per chunk and a
burst of all tasks at once.

Inside a batch job, placement also decides when to stop handing out work
(draining): no task is handed out that would not finish ``drain_margin_s`` before
the job ends. The same holds per engine: an engine whose own batch job ends
earlier (engines ``ipmtc add`` started from another job; each notes its job's end)
gets nothing that would not finish before that end, while the others carry on.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

from .ledger import TaskTimes
from .options import Options

TARGET_CHUNK_S = 1.0  # a chunk this long makes per-message cost (~5-10 ms CPU here) about 1%
CHANNEL_CHUNK_S = 0.1  # over the channel a chunk costs ~1 ms (both ends): 0.1 s keeps that ~1%
MAX_CHUNK = 10_000  # bounds message size and the work lost with one engine
STATIC_WINDOW_PER_ENGINE = 2
ENDS_CHECK_EVERY_S = 0.5  # whether every engine's job ends too soon: looked at this often, not per chunk
DYNAMIC_WINDOW_PER_ENGINE = 2  # one running + one waiting on the engine hides the round trip


class Placement:
    """The engines of one map, how many chunks each holds, and the placement policy over them."""

    def __init__(self, opts: Options, engines: list[int], n_total: int | None, times: TaskTimes,
                 only: set[int] | None = None):
        self.opts, self.static, self.n_total, self.times = opts, opts.static, n_total, times
        self.only = only  # a map over a view: its engines only (no others join)
        self.engines: list[int] = list(engines)  # alive, in rotation order
        self.known: set[int] = set(self.engines)  # every engine this map has seen
        self.load: dict[int, int] = {}  # engine -> chunks placed on it and not answered yet
        self.rot = 0
        self.draining = False
        self.exclusive: set[int] = set()  # engines running a task under crash suspicion: nothing else goes there
        self.leaving: set[int] = set()  # engines `ipmtc remove` drains: nothing more goes there
        self.ends: dict[int, float] = {}  # engine -> epoch its batch job ends (an added job's engines, say)
        self.holding: set[int] = set()  # engines that joined mid-map, kept out until their end is known
        self._ends_checked = 0.0

    # ------------------------------------------------------------ the engines

    def track(self, alive_ids: list[int]) -> tuple[list[int], list[int]]:
        """Follow the client's engines: (lost, new); the lost leave the rotation, the new join it."""
        alive = set(alive_ids)
        lost = [e for e in self.engines if e not in alive]
        if lost:
            self.engines = [e for e in self.engines if e in alive]
            for e in lost:
                self.load.pop(e, None)
                self.exclusive.discard(e)
        new = [e for e in alive_ids if e not in self.known and (self.only is None or e in self.only)]
        if new:  # replacements (or late starters) join the rotation
            self.known.update(new)
            self.engines += new
        return lost, new

    def drop(self, engine: int) -> None:
        """``engine`` takes no part in this map (a newcomer of another pool); it holds nothing yet."""
        if engine in self.engines:
            self.engines.remove(engine)
        self.load.pop(engine, None)
        self.holding.discard(engine)

    def placed(self, target: int, alone: bool = False) -> None:
        """A chunk went to ``target``; ``alone``: a suspect's, which has the engine to itself until answered."""
        self.load[target] = self.load.get(target, 0) + 1
        if alone:
            self.exclusive.add(target)

    def released(self, target: int) -> None:
        if target in self.load:  # (a lost engine's count is gone already)
            self.load[target] -= 1
            if not self.load[target]:
                self.exclusive.discard(target)

    def idle(self, target: int) -> bool:
        return not self.load.get(target, 0)

    def next_turn(self) -> None:
        """The rotation moves on (after a chunk was dealt)."""
        self.rot += 1

    # ------------------------------------------------------------ the policy

    def window(self, pending: int | None) -> int:
        """Chunks in flight per engine; ``pending``: tasks still to hand out (None: unknown)."""
        if self.static:
            return STATIC_WINDOW_PER_ENGINE
        if pending is not None and pending < len(self.engines):
            # the tail: a chunk queued behind a running one could not move to the engine that
            # frees up first; one at a time lets the last tasks go where an engine is idle
            return 1
        return DYNAMIC_WINDOW_PER_ENGINE

    def has_room(self, n_inflight: int, pending: int | None) -> bool:
        return bool(self.engines) and n_inflight < self.window(pending) * len(self.engines)

    def waits_for_turn(self) -> bool:
        """Static: the fixed deal waits for the engine whose turn it is to have room."""
        if not self.static:
            return False
        return self.load.get(self.engines[self.rot % len(self.engines)], 0) >= STATIC_WINDOW_PER_ENGINE

    def candidates(self, pending: int | None, exclude: int | None = None) -> list[int]:
        """Engines with room, in placement order: rotation (static) or least loaded first (dynamic)."""
        window = self.window(pending)
        n_eng = len(self.engines)
        order = [self.engines[(self.rot + k) % n_eng] for k in range(n_eng)]
        eligible = self._eligible()
        room = [e for e in order if self.load.get(e, 0) < window and e != exclude and e not in self.exclusive
                and eligible(e)]
        if not self.static:
            room.sort(key=lambda e: self.load.get(e, 0))  # stable: rotation breaks ties
        return room

    def _eligible(self) -> Callable[[int], bool]:
        """Whether an engine may take more of this map now: not leaving, not held for its note, its job not
        ending too soon (the median and the time taken once, not per engine)."""
        now, median = time.time(), self.times.median() if self.ends else 0.0

        def eligible(e: int) -> bool:
            return e not in self.leaving and e not in self.holding and not self.closing(e, now, median)

        return eligible

    def rerun_targets(self, exclude: int | None, pending: int | None) -> list[int]:
        """Where a straggler's second copy may go: engines with room first, any other eligible engine else."""
        eligible = self._eligible()
        return self.candidates(pending, exclude=exclude) or [e for e in self.engines if e != exclude and eligible(e)]

    def chunk_size(self, remaining: int | None, listening: bool) -> int:
        """Tasks in the next chunk; ``remaining``: tasks not finished, ``listening``: the channel is in use."""
        cs = self.opts.chunksize
        n_eng = max(1, len(self.engines))
        if cs != "auto":
            return int(cs)
        if self.static:
            if self.n_total is not None:  # fair share: one message per engine when it fits
                return max(1, min(MAX_CHUNK, math.ceil(self.n_total / n_eng)))
            return 1000
        if self.times.mean is None:
            return 1  # probe: learn task times before grouping
        target_s = CHANNEL_CHUNK_S if listening else TARGET_CHUNK_S
        size = target_s / max(self.times.mean, 1e-7)
        if remaining is not None:  # guided: shrink toward the end so engines finish together
            size = min(size, remaining / (4 * n_eng))
        return max(1, min(MAX_CHUNK, int(size)))

    def closing(self, engine: int, now: float, median: float) -> bool:
        """Whether ``engine``'s batch job ends before one more task placed there (behind what it holds) would
        finish ``drain_margin_s`` early: the per-engine form of draining, for engines of jobs ending before the
        map's own allocation (``ipmtc add`` from another job)."""
        end = self.ends.get(engine)
        if end is None:
            return False
        return now + (self.load.get(engine, 0) + 1) * median + self.opts.drain_margin_s > end

    def should_drain(self) -> bool:
        """Whether to hand out nothing more: the allocation ends before another task could finish (the map's own
        ``drain_at``, or every engine's job: each one's end known and too near)."""
        if not self.draining:
            now = time.time()
            if self.opts.drain_at is not None and now + self.times.median() + self.opts.drain_margin_s > \
                    self.opts.drain_at:
                self.draining = True
            elif self.ends and now - self._ends_checked >= ENDS_CHECK_EVERY_S:
                self._ends_checked = now
                cut = now + self.times.median() + self.opts.drain_margin_s
                self.draining = bool(self.engines) and all(e in self.ends and cut > self.ends[e]
                                                           for e in self.engines)
        return self.draining
