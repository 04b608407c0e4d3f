"""How chunks reach the engines and how their answers come back: the maps' only contact with the client.

A chunk goes over the client's :class:`~.channel.Channel` where the target
engine's listener is connected, as an ipyparallel apply of
:data:`~.runner.RUN_CHUNK` where it is not (chosen per engine, per chunk). Either
way it comes back as a :class:`Completion`, decoded here, and its copies in this
process (and, for applies, in the hub) are forgotten here: bounded memory over
millions of tasks. The transport also keeps the chunks in flight (where each went)
and sends the straggler aborts.
"""
from __future__ import annotations

import itertools
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipyparallel.error import NoEnginesRegistered

from .. import _ipp
from ..errors import ChannelLost
from . import runner
from .channel import Channel, ChannelResult
from .spec import MapSpec

PURGE_EVERY = 256  # hub/client purges are batched
# how a chunk that did not run ends when its engine or listener went away (run again, uncharged)
LOST_NAMES = frozenset({"EngineError", "ImpossibleDependency", "UnmetDependency", "TaskAborted", "ChannelLost"})


class EngineGone(Exception):
    """The target engine left the client since the dispatcher last looked (the chunk was not sent)."""


@dataclass
class Chunk:
    """Tasks sent together to one engine, and the handle their answer comes on."""

    indices: list[int]
    target: int
    submitted: float
    handle: Any  # an ipyparallel AsyncResult or a ChannelResult
    speculative: bool = False
    seq: int = 0  # order of submission (an engine runs its chunks in this order)


@dataclass
class Completion:
    """A chunk's answer, decoded. Exactly one of: ``lost``, ``error`` or the rows and entries."""

    engine_id: int | None
    node: str = ""  # where it ran (with rows and entries)
    pid: int = 0
    rows: list[runner.Row] = field(default_factory=list)  # (index, status, payload, started, finished)
    entries: list[tuple] = field(default_factory=list)  # ok tasks sent for the journal, see runner
    journal_part: tuple[bytes, bytes] | None = None  # their keys and ``entries`` as the engine pickled them
    lost: bool = False  # the engine or its listener went away: run again, uncharged
    crashed: bool = False  # (lost) its engine died: the crash rules apply (see .crashes)
    also_lost: list[list[int]] = field(default_factory=list)  # (crashed) the engine's other unanswered chunks
    error: dict[str, str] | None = None  # the chunk could not run at all: each task is charged


def _unanswered(chunk: Chunk) -> bool:
    """Not answered by its engine: still waiting, or lost with it (a chunk it was running, or queued)."""
    handle = chunk.handle
    if not handle.ready():
        return True
    if isinstance(handle, ChannelResult):
        return isinstance(handle.error, ChannelLost)
    try:
        handle.get(timeout=0)
    except Exception as e:  # the hub answered for the dead engine
        return getattr(e, "ename", type(e).__name__) in LOST_NAMES
    return False


def _sendable(item: Any) -> bool:
    from ipyparallel.serialize import serialize_object

    try:
        serialize_object(item)
        return True
    except Exception:
        return False


class Transport:
    """One map's submissions and completions over one client (channel where it can, applies where not)."""

    def __init__(self, client: Any, spec: MapSpec, on_done: Callable[[str], None]):
        self.client, self.spec, self.on_done = client, spec, on_done
        self.inflight: dict[str, Chunk] = {}  # msg id -> chunk, until its completion is handled
        self.rescued: set[str] = set()  # msg ids whose tasks were sent again elsewhere; a late answer is dropped
        self.channel: Channel | None = None
        self._late: Channel | None = None  # the client's channel, whose late attach replies we purge
        self.map_id = ""
        self._to_purge: list[str] = []
        self._seq = itertools.count()
        self.last_apply_answer = time.monotonic()  # an apply's answer shows the controller lives

    # ------------------------------------------------------------ the channel

    def open(self, engines: list[int]) -> None:
        """Use the client's channel for this map if it can take the spec; ask the engines to listen."""
        ch = Channel.for_client(self.client)
        if ch is None:
            return
        self._late = ch
        try:
            self.map_id = ch.begin_map(self.spec)
        except Exception:  # something plain applies can send and the channel cannot: use applies
            return
        self.channel = ch
        self.attach(engines)

    def attach(self, engines: list[int]) -> None:
        if self.channel is not None:
            self.channel.attach(self.client, engines)

    def listening(self, engine: int | None = None) -> bool:
        """Whether ``engine`` (or, without one, any engine) takes chunks over the channel."""
        ch = self.channel
        if ch is None:
            return False
        return ch.listening(engine) if engine is not None else bool(ch.connected)

    def close(self) -> None:
        """End the map on the channel: an aborted map's chunks' late answers are not kept."""
        if self.channel is not None:
            self.channel.end_map(self.map_id)
            for mid in list(self.inflight):
                self.channel.forget(mid)

    # ------------------------------------------------------------ submission

    def engine_ids(self) -> list[int]:
        """The engines registered with the client now, less those the channel saw die."""
        gone = self.channel.gone if self.channel is not None else ()
        return [e for e in self.client.ids if e not in gone]

    def submit(self, indices: list[int], tasks: list[tuple[int, Any]], target: int,
               speculative: bool = False) -> Chunk:
        """Send ``tasks`` = [(index, item), ...] to ``target``.

        Raises :class:`EngineGone`, or what serializing an input raised (nothing was sent then).
        """
        now = time.time()
        try:
            handle = None
            if self.channel is not None and self.listening(target):
                try:
                    handle = self.channel.submit(target, self.map_id, tasks)
                except Exception:  # an input the channel cannot serialize: ipyparallel says why below
                    handle = None
            if handle is None:
                handle = self.client[target].apply_async(runner.RUN_CHUNK, self.spec, tasks)
        except (IndexError, NoEnginesRegistered):
            raise EngineGone(target) from None
        chunk = Chunk(indices, target, now, handle, speculative, next(self._seq))
        mid = handle.msg_ids[0]
        self.inflight[mid] = chunk
        handle.add_done_callback(lambda _f, mid=mid: self.on_done(mid))
        return chunk

    @staticmethod
    def unsendable(tasks: list[tuple[int, Any]]) -> list[int]:
        """Indices of the inputs that cannot be serialized."""
        return [i for i, item in tasks if not _sendable(item)]

    # ------------------------------------------------------------ completion

    def complete(self, mid: str) -> tuple[Chunk, Completion] | None:
        """The chunk answered on ``mid`` and its decoded answer (None: not ours any more); forgets it."""
        chunk = self.inflight.get(mid)
        if chunk is None:
            if mid in self.rescued:  # its tasks were resubmitted when the engine was lost
                self.rescued.discard(mid)
                self.forget(mid)
            return None
        done = self._decode(mid, chunk)
        if not isinstance(chunk.handle, ChannelResult):
            self.last_apply_answer = time.monotonic()
        del self.inflight[mid]
        self.forget(mid)
        if done.crashed:  # the engine's other unanswered chunks died with it: one event, booked at once
            done.also_lost = [c.indices for c in self._take_engine(chunk.target)]
        return chunk, done

    def _take_engine(self, target: int) -> list[Chunk]:
        """Every unanswered chunk on ``target`` (a dead engine), taken back; their late answers are dropped."""
        taken = sorted((c for c in self.inflight.values() if c.target == target and _unanswered(c)),
                       key=lambda c: c.seq)
        for chunk in taken:
            mid = chunk.handle.msg_ids[0]
            self.inflight.pop(mid)
            self.rescued.add(mid)
            if self.channel is not None:
                self.channel.forget(mid)  # a dead engine's listener never answers
        return taken

    def _decode(self, mid: str, chunk: Chunk) -> Completion:
        eid = self.engine_of(mid, chunk)
        try:
            node, pid, rows, blob = chunk.handle.get(timeout=0)
        except Exception as e:
            ename = getattr(e, "ename", type(e).__name__)
            if ename in LOST_NAMES:
                # the hub's EngineError: the engine died with the task; the channel says so itself
                died = ename == "EngineError" or bool(getattr(e, "engine_died", False))
                return Completion(eid, lost=True, crashed=died)
            # the chunk could not run at all (e.g. the function cannot be unpickled there)
            return Completion(eid, error={"ename": ename, "evalue": str(getattr(e, "evalue", e)),
                                          "traceback": getattr(e, "traceback", "") or ""})
        # with a journal, the engine sent the ok tasks apart: their keys in one pickle (stored, never
        # unpickled here) and their rows in another; ``rows`` has the rest
        entries = pickle.loads(blob[1]) if blob else []
        return Completion(eid, node, pid, rows, entries, blob)

    def engine_of(self, mid: str, chunk: Chunk) -> int | None:
        eid = _ipp.engine_of_reply(self.client, mid, chunk.handle)
        return eid if eid is not None else chunk.target

    def forget(self, mid: str) -> None:
        """Drop the client's copy of a handed-back result; bounded memory for a million tasks."""
        if self.channel is not None and mid in self.channel.results:
            self.channel.forget(mid)  # never went through ipyparallel
            return
        _ipp.forget_result(self.client, mid)
        self._to_purge.append(mid)
        if len(self._to_purge) >= PURGE_EVERY:
            self.flush_purge()

    def flush_purge(self) -> None:
        if self._late is not None:
            self._to_purge += self._late.take_late_purge()
        if not self._to_purge:
            return
        ids, self._to_purge = self._to_purge, []
        try:
            # sent without waiting for the hub's answer: a blocking purge would hold the map
            # for a hub round trip each time, the last one inside every map's wall time
            _ipp.purge_hub_nowait(self.client, ids)
        except Exception:  # NoDB keeps nothing to purge; a busy hub is not worth failing for
            pass

    # ------------------------------------------------------------ for supervision

    def rescue(self, lost: set[int]) -> dict[int, list[Chunk]]:
        """Take back the unanswered chunks placed on ``lost`` engines (their tasks are to run again), by engine.

        A chunk whose engine was only unregistered, not dead, may still answer: that
        late answer is dropped (:attr:`rescued`).
        """
        if self.channel is not None:
            for e in lost:
                self.channel.drop_engine(e)
        return {e: self._take_engine(e) for e in lost}

    def take_applies(self) -> list[Chunk]:
        """The unanswered chunks sent as applies (the controller is gone: they will never answer)."""
        taken = [c for c in self.inflight.values() if not isinstance(c.handle, ChannelResult) and not c.handle.ready()]
        for chunk in taken:
            mid = chunk.handle.msg_ids[0]
            self.inflight.pop(mid)
            self.rescued.add(mid)
        return taken

    def abandon(self) -> list[Chunk]:
        """Every chunk in flight, taken back with nothing to wait for (all engines are gone)."""
        chunks = list(self.inflight.values())
        for mid in list(self.inflight):
            self.inflight.pop(mid)
            if self.channel is not None:
                self.channel.forget(mid)
        return chunks

    def running(self, mid: str, chunk: Chunk) -> tuple[int, float] | None:
        """(index, start time) of the chunk's task running now, if its engine told."""
        if isinstance(chunk.handle, ChannelResult):  # told over the channel
            return chunk.handle.task_started
        md = self.client.metadata.get(mid)
        return md.get("data", {}).get("ipmtc_started") if md else None

    def interrupt(self, engine_id: int) -> None:
        """SIGINT to an engine: its runner aborts the task it runs."""
        try:
            self.client.send_signal(signal.SIGINT, targets=[engine_id], block=False)
        except Exception:
            pass
