"""Slot bookkeeping for command tasks wider than one core (pure: no processes, no I/O).

Every engine is one core slot on a node. A task needs either ``K`` cores on one node
(a threaded program) or ``R`` MPI ranks of one core each, possibly spread over several
nodes. :class:`SlotBook` tracks which slots are free; :class:`Queue` decides which
waiting tasks start now (largest first, backfill, and a reservation so that a wide
task is never starved by a stream of narrow ones), in the spirit of RADICAL-Pilot's
agent scheduler.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Need:
    """What one task holds while it runs."""

    cores: int = 1  # cores on one node (ranks == 0)
    ranks: int = 0  # > 0: an MPI task of this many ranks, one core each
    nodes: int | None = None  # MPI only: exactly this many nodes

    @property
    def width(self) -> int:
        """Slots held while running."""
        return self.ranks if self.ranks > 0 else self.cores

    @property
    def is_mpi(self) -> bool:
        return self.ranks > 0


def spread(ranks: int, nodes: int) -> list[int]:
    """Ranks per node, as even as possible and largest first: ``spread(9, 4) == [3, 2, 2, 2]``.

    Not ``ceil(R/n)`` on every node but the last: that can leave the last node empty
    (9 ranks on 4 nodes would be 3+3+3+0), which breaks "exactly ``nodes`` nodes".
    """
    q, r = divmod(ranks, nodes)
    return [q + 1] * r + [q] * (nodes - r)


@dataclass(frozen=True)
class Grant:
    """The slots one task got: (node, slot ids on it) pairs in allocation order.

    The lead slot (where the task is started) is the first slot of the first node.
    A tuple of pairs rather than a dict keeps the grant immutable and ordered.
    """

    slots: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def lead(self) -> int:
        return self.slots[0][1][0]

    @property
    def width(self) -> int:
        return sum(len(ids) for _, ids in self.slots)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(node for node, _ in self.slots)

    @property
    def all_slots(self) -> tuple[int, ...]:
        return tuple(s for _, ids in self.slots for s in ids)

    def by_node(self) -> dict[str, tuple[int, ...]]:
        return dict(self.slots)

    def hosts_arg(self) -> str:
        """``"n1:4,n2:4"``: the hydra ``-hosts`` form (ranks per host)."""
        return ",".join(f"{node}:{len(ids)}" for node, ids in self.slots)


class SlotBook:
    """Free/busy slots per node. Slot ids are ints (ipmtc uses engine ids), unique across nodes."""

    def __init__(self, nodes: Mapping[str, Sequence[int]]) -> None:
        self._slots: dict[str, list[int]] = {}  # live slots per node, allocation order
        self._node_of: dict[int, str] = {}
        self._free: dict[str, int] = {}
        self._order: dict[str, int] = {}  # tie-breaker: allocation order, new nodes last
        self._owner: dict[int, Grant] = {}  # busy slot -> the grant holding it
        self._held: dict[int, Grant] = {}  # id(grant) -> grant, for every grant not yet given back
        for node, ids in nodes.items():
            for slot in ids:
                self.add(node, slot)

    # ------------------------------------------------------------------ views

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._slots)

    @property
    def total(self) -> int:
        return len(self._node_of)

    @property
    def free(self) -> int:
        return len(self._node_of) - len(self._owner)  # O(1): pop_ready asks once per waiting task

    @property
    def busy(self) -> int:
        return len(self._owner)

    @property
    def free_per_node(self) -> dict[str, int]:
        return dict(self._free)

    @property
    def size_per_node(self) -> dict[str, int]:
        return {node: len(ids) for node, ids in self._slots.items()}

    @property
    def free_slots(self) -> frozenset[int]:
        return frozenset(s for s in self._node_of if s not in self._owner)

    def node_of(self, slot: int) -> str:
        return self._node_of[slot]

    # ------------------------------------------------------------------ feasibility

    def check(self, need: Need) -> str | None:
        """Why ``need`` can never fit this allocation (as it is now), else None."""
        sizes = sorted((len(ids) for ids in self._slots.values()), reverse=True)
        if need.ranks < 0:
            return f"ranks must be >= 0, got {need.ranks}"
        if not need.is_mpi:
            if need.nodes is not None:
                return "nodes= applies only to MPI tasks (ranks > 0)"
            if need.cores < 1:
                return f"cores must be >= 1, got {need.cores}"
            largest = sizes[0] if sizes else 0
            if need.cores > largest:
                return f"needs {need.cores} cores on one node but the largest node has {largest}"
            return None
        if need.cores != 1:
            return f"cores={need.cores} with ranks={need.ranks}: MPI ranks take one core each"
        if need.ranks > self.total:
            return f"needs {need.ranks} ranks but the allocation has {self.total} slots"
        if need.nodes is None:
            return None
        if need.nodes < 1:
            return f"nodes must be >= 1, got {need.nodes}"
        if need.nodes > len(sizes):
            return f"needs {need.nodes} nodes but the allocation has {len(sizes)}"
        if need.ranks < need.nodes:
            return f"{need.ranks} ranks cannot cover {need.nodes} nodes (ranks < nodes)"
        # Largest counts on largest nodes is the best assignment there is.
        for count, size in zip(spread(need.ranks, need.nodes), sizes):
            if count > size:
                return (
                    f"needs up to {count} ranks per node on {need.nodes} nodes "
                    f"but only {sum(s >= count for s in sizes)} nodes have {count} slots"
                )
        return None

    def covers(self, need: Need, nodes: Collection[str]) -> bool:
        """Whether ``nodes``, once completely free, can host ``need`` (ignores other nodes)."""
        sizes = sorted((len(self._slots.get(n, ())) for n in nodes), reverse=True)
        if not need.is_mpi:
            return bool(sizes) and sizes[0] >= need.cores
        if need.nodes is None:
            return sum(sizes) >= need.ranks
        counts = spread(need.ranks, need.nodes)
        return len(sizes) >= len(counts) and all(c <= s for c, s in zip(counts, sizes))

    def plan(self, need: Need, *, prefer_not: Collection[str] = ()) -> tuple[str, ...]:
        """The nodes to reserve for ``need``: enough capacity, choosing the most free first.

        Order: nodes outside ``prefer_not`` (other reservations) first, then most free
        slots, then most slots, then allocation order. ``need`` must pass :meth:`check`.
        """
        ranked = sorted(
            self._slots,
            key=lambda n: (n in prefer_not, -self._free[n], -len(self._slots[n]), self._order[n]),
        )
        size = {n: len(self._slots[n]) for n in ranked}
        if not need.is_mpi:
            return tuple(n for n in ranked if size[n] >= need.cores)[:1]
        if need.nodes is not None:
            chosen: list[str] = []
            for count in spread(need.ranks, need.nodes):  # largest first, so greedy cannot dead-end
                chosen.append(next(n for n in ranked if n not in chosen and size[n] >= count))
            return tuple(chosen)
        chosen, got = [], 0
        for n in ranked:
            if got >= need.ranks:
                break
            chosen.append(n)
            got += size[n]
        return tuple(chosen)

    # ------------------------------------------------------------------ take / give back

    def take(self, need: Need, *, avoid: Collection[str] = ()) -> Grant | None:
        """Grant ``need`` now (slots become busy), or None if it does not fit now.

        Never uses nodes in ``avoid`` (reserved for someone else). Raises ValueError if
        the need can never fit (returning None would leave it waiting forever).
        """
        why = self.check(need)
        if why is not None:
            raise ValueError(why)
        cand = [n for n in self._slots if self._free[n] > 0 and n not in avoid]
        if not need.is_mpi:
            # Best fit: the fullest node that still fits keeps big holes for wide tasks.
            fits = [n for n in cand if self._free[n] >= need.cores]
            if not fits:
                return None
            node = min(fits, key=lambda n: (self._free[n], self._order[n]))
            return self._grant([(node, need.cores)])
        # MPI: the emptiest nodes first, so the task spans as few nodes as possible.
        cand.sort(key=lambda n: (-self._free[n], self._order[n]))
        if need.nodes is not None:
            counts = spread(need.ranks, need.nodes)
            top = cand[: need.nodes]
            if len(top) < need.nodes or any(self._free[n] < c for n, c in zip(top, counts)):
                return None
            return self._grant(list(zip(top, counts)))
        full: list[tuple[str, int]] = []
        left = need.ranks
        for i, node in enumerate(cand):
            if self._free[node] >= left:
                # Last node: best fit among the rest, same node count, bigger holes kept.
                last = min(
                    (n for n in cand[i:] if self._free[n] >= left),
                    key=lambda n: (self._free[n], self._order[n]),
                )
                return self._grant([*full, (last, left)])
            full.append((node, self._free[node]))
            left -= self._free[node]
        return None

    def _grant(self, parts: list[tuple[str, int]]) -> Grant:
        slots: list[tuple[str, tuple[int, ...]]] = []
        for node, count in parts:
            ids = tuple([s for s in self._slots[node] if s not in self._owner][:count])
            slots.append((node, ids))
        grant = Grant(tuple(slots))
        for node, ids in slots:
            for s in ids:
                self._owner[s] = grant
            self._free[node] -= len(ids)
        self._held[id(grant)] = grant
        return grant

    def give_back(self, grant: Grant) -> None:
        """Free the slots of ``grant``; slots removed meanwhile are simply skipped."""
        if self._held.pop(id(grant), None) is not grant:
            raise ValueError(f"grant {grant.hosts_arg()} (lead {grant.lead}) is not held: given back twice?")
        for s in grant.all_slots:
            # Identity check: a removed slot id that was added again belongs to someone else now.
            if self._owner.get(s) is grant:
                del self._owner[s]
                self._free[self._node_of[s]] += 1

    # ------------------------------------------------------------------ engines come and go

    def remove(self, slot: int) -> None:
        """A slot (engine) is lost for good. A grant holding it can still be given back."""
        node = self._node_of.pop(slot)
        self._slots[node].remove(slot)
        if self._owner.pop(slot, None) is None:
            self._free[node] -= 1
        if not self._slots[node]:  # an empty node must not count towards check()'s node count
            del self._slots[node], self._free[node]

    def add(self, node: str, slot: int) -> None:
        """A new engine joined on ``node`` (a new node goes last in allocation order)."""
        if slot in self._node_of:
            raise ValueError(f"slot {slot} is already on node {self._node_of[slot]}")
        if node not in self._slots:
            self._slots[node], self._free[node] = [], 0
            self._order.setdefault(node, len(self._order))
        self._slots[node].append(slot)
        self._node_of[slot] = node
        self._free[node] += 1


@dataclass
class _Waiting:
    need: Need
    passed: int = 0  # later tasks started while this one waited
    reserved: tuple[str, ...] = ()  # nodes held back for it once patience ran out


class Queue:
    """Tasks waiting for slots: largest first, backfill, and reservations against starvation.

    Tasks are offered in descending width, then task index ("largest first" packs best
    when the whole list is known up front); a retried task pushed again thus keeps its
    place by index among tasks of the same width. When a task does not fit, later ones
    that fit start around it (backfill). A task passed over by ``patience`` later tasks
    (default: twice the slots in the book) gets a reservation: the nodes chosen by
    :meth:`SlotBook.plan`, fixed until it starts; no task behind it may start on those
    nodes, so they drain and it starts. Narrow tasks keep using the other nodes.
    """

    def __init__(self, book: SlotBook, *, patience: int | None = None) -> None:
        if patience is not None and patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.book = book
        self._patience = patience
        self._waiting: dict[int, _Waiting] = {}
        self._order: list[tuple[int, int]] = []  # (-width, index), sorted

    @property
    def patience(self) -> int:
        # Follows the book, so that engines joining later lengthen it.
        return self._patience if self._patience is not None else 2 * self.book.total

    def push(self, index: int, need: Need) -> None:
        """Task ``index`` becomes ready (also a retry). Raises ValueError if it can never fit."""
        if index in self._waiting:
            raise ValueError(f"task {index} is already waiting")
        why = self.book.check(need)
        if why is not None:
            raise ValueError(f"task {index}: {why}")
        self._waiting[index] = _Waiting(need)
        bisect.insort(self._order, (-need.width, index))

    def remove(self, index: int) -> None:
        """Drop a waiting task (e.g. draining). KeyError if it is not waiting."""
        need = self._waiting.pop(index).need
        del self._order[bisect.bisect_left(self._order, (-need.width, index))]

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, index: object) -> bool:
        return index in self._waiting

    def __iter__(self) -> Iterator[int]:
        """Waiting task indices, in the order they are offered."""
        return iter([index for _, index in self._order])

    def reservation(self, index: int) -> tuple[str, ...]:
        """Nodes reserved for waiting task ``index`` (empty: none yet)."""
        return self._waiting[index].reserved

    def pop_impossible(self) -> list[tuple[int, str]]:
        """Drop and return (index, why) for waiting tasks that can no longer fit (after removals)."""
        out = [(i, why) for i in self if (why := self.book.check(self._waiting[i].need)) is not None]
        for index, _ in out:
            self.remove(index)
        return out

    def pop_ready(self) -> list[tuple[int, Grant]]:
        """Every task that can start now, with its grant (the slots are already taken in the book)."""
        started: list[tuple[int, Grant]] = []
        skipped: list[tuple[_Waiting, int]] = []  # (task, number started before it was skipped)
        blocked: set[str] = set()  # nodes reserved by tasks ahead of the current one
        # The book only fills up and `blocked` only grows during a round, so a need that
        # failed once fails again: this keeps a long queue of identical tasks cheap.
        failed: set[Need] = set()
        verdict: dict[Need, str | None] = {}
        for _, index in self._order:
            if self.book.free == 0:
                break  # nothing behind can start: no pass-overs to count either
            w = self._waiting[index]
            if w.need not in verdict:
                verdict[w.need] = self.book.check(w.need)
            if verdict[w.need] is not None:
                continue  # can never fit now: left for pop_impossible(), blocks nobody
            grant = None if w.need in failed else self.book.take(w.need, avoid=blocked)
            if grant is not None:
                started.append((index, grant))
                continue
            failed.add(w.need)
            skipped.append((w, len(started)))
            if w.reserved and not self.book.covers(w.need, w.reserved):
                w.reserved = ()  # its nodes lost slots: plan again below
            blocked.update(w.reserved)
        if started:
            done = {index for index, _ in started}
            for index in done:
                del self._waiting[index]
            self._order = [key for key in self._order if key[1] not in done]
        patience = self.patience
        taken = {n for w, _ in skipped for n in w.reserved}
        for w, before in skipped:
            w.passed += len(started) - before
            if not w.reserved and w.passed >= patience:
                w.reserved = self.book.plan(w.need, prefer_not=taken)
                taken.update(w.reserved)
        return started
