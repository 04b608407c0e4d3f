"""Tests for ipmtc.slots: slot bookkeeping and the wait queue (pure, deterministic, simulated time)."""

from __future__ import annotations

import heapq
import random
from collections import deque

import pytest

from ipmtc.slots import Grant, Need, Queue, SlotBook, spread


def _book(*sizes: int) -> SlotBook:
    """Nodes n1, n2, ... with the given slot counts; slot ids 0, 1, 2, ... across nodes."""
    nodes: dict[str, list[int]] = {}
    next_id = 0
    for i, size in enumerate(sizes, start=1):
        nodes[f"n{i}"] = list(range(next_id, next_id + size))
        next_id += size
    return SlotBook(nodes)


def _take(book: SlotBook, need: Need) -> Grant:
    grant = book.take(need)
    assert grant is not None
    return grant


def _assert_shape(book: SlotBook, need: Need, grant: Grant) -> None:
    assert grant.width == need.width
    assert all(book.node_of(s) == node for node, ids in grant.slots for s in ids)
    if not need.is_mpi:
        assert len(grant.slots) == 1
    elif need.nodes is not None:
        assert sorted((len(ids) for _, ids in grant.slots), reverse=True) == spread(need.ranks, need.nodes)


# --------------------------------------------------------------------------- Need / Grant


def test_need_width_and_kind():
    assert Need().width == 1 and not Need().is_mpi
    assert Need(cores=4).width == 4
    assert Need(ranks=8, nodes=2).width == 8 and Need(ranks=8).is_mpi


@pytest.mark.parametrize(
    ("ranks", "nodes", "expected"),
    [(8, 2, [4, 4]), (9, 4, [3, 2, 2, 2]), (5, 5, [1] * 5), (7, 1, [7])],
)
def test_spread_is_even_and_never_leaves_a_node_empty(ranks, nodes, expected):
    assert spread(ranks, nodes) == expected


def test_grant_views():
    g = Grant((("n2", (5, 6, 7)), ("n1", (0,))))
    assert g.lead == 5 and g.width == 4
    assert g.nodes == ("n2", "n1") and g.all_slots == (5, 6, 7, 0)
    assert g.hosts_arg() == "n2:3,n1:1"
    assert g.by_node() == {"n2": (5, 6, 7), "n1": (0,)}


# --------------------------------------------------------------------------- SlotBook.take


def test_k_core_grants_are_on_one_node_and_disjoint():
    book = _book(4, 4)
    a = _take(book, Need(cores=3))
    b = _take(book, Need(cores=3))
    assert len(a.slots) == len(b.slots) == 1 and a.nodes != b.nodes
    assert not set(a.all_slots) & set(b.all_slots)
    assert book.take(Need(cores=3)) is None  # 1 + 1 free, but not on one node
    assert book.free == 2 and book.busy == 6
    assert book.free_per_node == {"n1": 1, "n2": 1}


def test_best_fit_puts_narrow_tasks_on_the_fullest_node_that_fits():
    book = _book(4, 4, 4)
    _take(book, Need(cores=3))  # n1: 1 free (best fit among equals: first node)
    _take(book, Need(cores=1))  # n1 again: the fullest node that fits -> 0 free
    assert book.free_per_node == {"n1": 0, "n2": 4, "n3": 4}
    _take(book, Need(cores=2))  # n2: 2 free
    one = _take(book, Need(cores=1))
    assert one.nodes == ("n2",)  # 1 free on n2, n3 stays whole
    three = _take(book, Need(cores=3))
    assert three.nodes == ("n3",)
    assert book.free_per_node == {"n1": 0, "n2": 1, "n3": 1}


def test_mpi_spans_fewest_nodes_emptiest_first_and_best_fits_the_rest():
    book = _book(4, 4, 4, 4)
    _take(book, Need(cores=2))  # n1: 2 free
    _take(book, Need(cores=1))  # n1: 1 free
    _take(book, Need(cores=1))  # n1: 0 free
    _take(book, Need(cores=1))  # n2: 3 free
    _take(book, Need(cores=2))  # n2: 1 free
    assert book.free_per_node == {"n1": 0, "n2": 1, "n3": 4, "n4": 4}
    g = _take(book, Need(ranks=5))
    # Two nodes are the minimum: n3 whole, the last rank best-fits on n2 (n4 stays whole).
    assert g.nodes == ("n3", "n2") and g.hosts_arg() == "n3:4,n2:1"
    assert g.lead == 8  # first slot of n3
    assert book.free_per_node == {"n1": 0, "n2": 0, "n3": 0, "n4": 4}


def test_mpi_lead_is_first_slot_of_first_node():
    book = _book(4, 4)
    g = _take(book, Need(ranks=6))
    assert g.hosts_arg() == "n1:4,n2:2" and g.lead == 0
    assert g.all_slots == (0, 1, 2, 3, 4, 5)


def test_mpi_with_nodes_spreads_ranks_evenly():
    book = _book(4, 4, 4, 4)
    g = _take(book, Need(ranks=8, nodes=2))
    assert [len(ids) for _, ids in g.slots] == [4, 4] and g.hosts_arg() == "n1:4,n2:4"
    book.give_back(g)
    g = _take(book, Need(ranks=9, nodes=4))
    assert [len(ids) for _, ids in g.slots] == [3, 2, 2, 2]
    assert book.free_per_node == {"n1": 1, "n2": 2, "n3": 2, "n4": 2}
    assert book.take(Need(ranks=8, nodes=4)) is None  # 2 on each node, but n1 has 1 free
    assert _take(book, Need(ranks=7, nodes=4)).hosts_arg() == "n2:2,n3:2,n4:2,n1:1"


def test_mpi_with_nodes_spreads_even_when_one_node_could_hold_all():
    book = _book(8, 8)
    g = _take(book, Need(ranks=4, nodes=2))
    assert g.hosts_arg() == "n1:2,n2:2"


@pytest.mark.parametrize(
    ("need", "message"),
    [
        (Need(cores=8), "needs 8 cores on one node but the largest node has 4"),
        (Need(ranks=20), "needs 20 ranks but the allocation has 16 slots"),
        (Need(ranks=10, nodes=5), "needs 5 nodes but the allocation has 4"),
        (Need(ranks=2, nodes=3), "2 ranks cannot cover 3 nodes (ranks < nodes)"),
        (Need(cores=0), "cores must be >= 1, got 0"),
        (Need(cores=-2), "cores must be >= 1, got -2"),
        (Need(ranks=-1), "ranks must be >= 0, got -1"),
        (Need(ranks=4, nodes=0), "nodes must be >= 1, got 0"),
        (Need(cores=2, nodes=2), "nodes= applies only to MPI tasks (ranks > 0)"),
        (Need(cores=2, ranks=4), "cores=2 with ranks=4: MPI ranks take one core each"),
        (Need(ranks=10, nodes=2), "needs up to 5 ranks per node on 2 nodes but only 0 nodes have 5 slots"),
    ],
)
def test_check_explains_needs_that_can_never_fit(need, message):
    book = _book(4, 4, 4, 4)
    assert book.check(need) == message
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        book.take(need)


@pytest.mark.parametrize(
    "need", [Need(), Need(cores=4), Need(ranks=16), Need(ranks=16, nodes=4), Need(ranks=4, nodes=4), Need(ranks=1)]
)
def test_check_accepts_needs_that_fit_an_empty_allocation(need):
    assert _book(4, 4, 4, 4).check(need) is None


def test_check_uses_the_uneven_node_sizes():
    book = _book(6, 2, 2)
    assert book.check(Need(ranks=8, nodes=2)) == "needs up to 4 ranks per node on 2 nodes but only 1 nodes have 4 slots"
    assert book.check(Need(ranks=7, nodes=3)) is None  # 3 + 2 + 2
    assert book.check(Need(ranks=9, nodes=3)) is not None  # 3 + 3 + 3 does not fit 6, 2, 2


def test_give_back_frees_and_refuses_a_second_time():
    book = _book(4)
    g = _take(book, Need(cores=4))
    book.give_back(g)
    assert book.free == 4 and book.busy == 0
    with pytest.raises(ValueError, match="not held"):
        book.give_back(g)


# --------------------------------------------------------------------------- remove / add


def test_remove_a_held_slot_and_add_a_new_one():
    book = _book(2, 2)
    g = _take(book, Need(cores=2))
    assert g.all_slots == (0, 1)
    book.remove(1)  # its engine died while the task ran
    assert book.busy == 1 and book.total == 3 and book.free == 2
    book.give_back(g)  # no error for the lost slot
    assert book.free_slots == {0, 2, 3} and book.free_per_node == {"n1": 1, "n2": 2}
    assert book.check(Need(cores=2)) is None  # n2 still has 2
    book.remove(2)
    assert book.check(Need(cores=2)) == "needs 2 cores on one node but the largest node has 1"
    book.add("n2", 7)
    assert book.size_per_node == {"n1": 1, "n2": 2}
    assert _take(book, Need(cores=2)).all_slots == (3, 7)
    book.add("n9", 8)
    assert book.nodes == ("n1", "n2", "n9") and book.free == 2
    with pytest.raises(ValueError, match="already on node n9"):
        book.add("n1", 8)


def test_removing_every_slot_of_a_node_removes_the_node():
    book = _book(2, 2)
    book.remove(2)
    book.remove(3)
    assert book.nodes == ("n1",)
    assert book.check(Need(ranks=2, nodes=2)) == "needs 2 nodes but the allocation has 1"


def test_a_slot_id_reused_after_removal_is_not_freed_by_the_old_grant():
    book = _book(2)
    old = _take(book, Need(cores=2))
    book.remove(0)
    book.add("n1", 0)  # same engine id comes back
    new = _take(book, Need(cores=1))
    assert new.all_slots == (0,)
    book.give_back(old)
    assert book.free_slots == {1}  # slot 0 still belongs to `new`
    book.give_back(new)
    assert book.free == 2


# --------------------------------------------------------------------------- Queue


def test_queue_offers_widest_first_then_by_index_and_backfills():
    book = _book(4, 4)
    q = Queue(book)
    for index, need in [(0, Need()), (1, Need(ranks=6)), (2, Need(cores=3)), (3, Need()), (4, Need(cores=3))]:
        q.push(index, need)
    assert list(q) == [1, 2, 4, 0, 3] and len(q) == 5
    started = q.pop_ready()
    assert [i for i, _ in started] == [1, 0, 3]  # 6 ranks start; 3-core tasks don't fit 2 free; 1-cores backfill
    assert list(q) == [2, 4] and book.free == 0


def test_queue_retry_keeps_its_place_by_index():
    q = Queue(_book(1))
    for index in (3, 5, 7):
        q.push(index, Need())
    [(first, grant)] = q.pop_ready()
    assert first == 3
    q.book.give_back(grant)
    q.push(3, Need())  # retried
    assert list(q) == [3, 5, 7]


def test_queue_push_remove_and_errors():
    q = Queue(_book(4))
    q.push(1, Need(cores=2))
    with pytest.raises(ValueError, match="already waiting"):
        q.push(1, Need())
    with pytest.raises(ValueError, match="task 2: needs 5 cores on one node"):
        q.push(2, Need(cores=5))
    q.push(2, Need(cores=2))
    q.remove(1)
    assert 1 not in q and 2 in q and len(q) == 1
    with pytest.raises(KeyError):
        q.remove(1)
    with pytest.raises(ValueError, match="patience"):
        Queue(_book(1), patience=-1)


def test_queue_pop_impossible_after_slots_are_lost():
    book = _book(4, 2)
    q = Queue(book)
    _take(book, Need(cores=4))
    q.push(0, Need(cores=4))
    q.push(1, Need(cores=2))
    assert [i for i, _ in q.pop_ready()] == [1]
    book.remove(0)
    assert q.pop_ready() == []  # impossible now, and it blocks nobody
    assert q.pop_impossible() == [(0, "needs 4 cores on one node but the largest node has 3")]
    assert len(q) == 0


def test_reservation_holds_back_only_its_own_nodes():
    book = _book(4, 4, 4, 4)
    q = Queue(book, patience=3)
    for index in range(1, 17):
        q.push(index, Need())
    running = deque(g for _, g in q.pop_ready())  # 16 singles fill n1..n4 in order (best fit)
    assert [g.nodes[0] for g in running] == ["n1"] * 4 + ["n2"] * 4 + ["n3"] * 4 + ["n4"] * 4
    q.push(0, Need(ranks=8))
    next_index, reserved_at = 17, None
    for step in range(1, 100):
        book.give_back(running.popleft())  # oldest finishes, a new 1-core task arrives
        q.push(next_index, Need())
        next_index += 1
        for index, grant in q.pop_ready():
            if index == 0:
                assert reserved_at is not None and set(grant.nodes) == {"n1", "n2"}
                return
            if reserved_at is not None:
                assert not set(grant.nodes) & {"n1", "n2"}  # backfill only around the reservation
            running.append(grant)
        if reserved_at is None and q.reservation(0):
            reserved_at = step
            assert step == 3  # three singles passed it
            assert q.reservation(0) == ("n1", "n2")  # all 0 free: tie broken by allocation order
    pytest.fail("the reserved MPI task never started")


# --------------------------------------------------------------------------- simulations


def _simulate(book: SlotBook, tasks: list[tuple[Need, float]], *, patience: int | None = None) -> float:
    """Event-driven run of all ``tasks`` (need, duration) pushed at t=0; returns the makespan in simulated seconds."""
    q = Queue(book, patience=patience)
    for index, (need, _) in enumerate(tasks):
        q.push(index, need)
    events: list[tuple[float, int, Grant]] = []
    now_s = 0.0
    while True:
        for index, grant in q.pop_ready():
            heapq.heappush(events, (now_s + tasks[index][1], index, grant))
        if not events:
            break
        now_s = events[0][0]
        while events and events[0][0] == now_s:  # everything ending at this instant frees first
            book.give_back(heapq.heappop(events)[2])
    assert len(q) == 0 and book.busy == 0
    return now_s


def test_packing_wide_and_narrow_tasks_reaches_the_lower_bound():
    book = _book(4, 4, 4, 4)
    tasks = [(Need(), 1.0)] * 200 + [(Need(ranks=8), 5.0)] * 20
    lower_bound_s = max(sum(n.width * d for n, d in tasks) / book.total, max(d for _, d in tasks))
    assert lower_bound_s == 62.5
    makespan_s = _simulate(book, tasks)
    assert makespan_s <= 1.05 * lower_bound_s
    # Durations are whole seconds, so 63 s is the best any schedule can do: 12.5 "rounds" of singles.
    assert makespan_s == 63.0


def test_packing_stays_close_with_mixed_durations():
    rng = random.Random(7)
    book = _book(4, 4, 4, 4)
    tasks = [(Need(), rng.uniform(0.5, 1.5)) for _ in range(200)]
    tasks += [(Need(cores=4), rng.uniform(2, 4)) for _ in range(10)]
    tasks += [(Need(ranks=8, nodes=2), rng.uniform(4, 6)) for _ in range(10)]
    rng.shuffle(tasks)
    lower_bound_s = max(sum(n.width * d for n, d in tasks) / book.total, max(d for _, d in tasks))
    assert _simulate(book, tasks) <= 1.10 * lower_bound_s


def _stream_until_started(patience: int | None, max_steps: int, *, rng: random.Random | None = None) -> int | None:
    """16 busy 1-core tasks on 4x4; each step one finishes and a new 1-core task arrives.

    Returns the step at which the 8-rank MPI task (pushed at step 0) started, or None.
    """
    book = _book(4, 4, 4, 4)
    q = Queue(book, patience=patience)
    running: list[Grant] = []
    for index in range(16):
        q.push(index, Need())
    running += [g for _, g in q.pop_ready()]
    q.push(10**6, Need(ranks=8))
    next_index = 16
    for step in range(1, max_steps + 1):
        # Oldest first (FIFO) or a random one: either way a slot frees one at a time.
        book.give_back(running.pop(rng.randrange(len(running)) if rng else 0))
        q.push(next_index, Need())
        next_index += 1
        for index, grant in q.pop_ready():
            if index == 10**6:
                assert grant.width == 8
                return step
            running.append(grant)
        held = [s for g in running for s in g.all_slots]
        assert len(held) == len(set(held))
    return None


def test_a_stream_of_narrow_tasks_starves_the_wide_one_without_reservations():
    assert _stream_until_started(patience=10**9, max_steps=500) is None


def test_a_wide_task_starts_within_a_bounded_number_of_steps_despite_a_narrow_stream():
    step = _stream_until_started(patience=None, max_steps=500)
    # 2 x 16 passes to earn the reservation, then at most 16 finishes drain its two nodes.
    assert step is not None and step <= 2 * 16 + 16


@pytest.mark.parametrize("seed", range(5))
def test_a_random_finish_order_still_lets_the_wide_task_start(seed):
    step = _stream_until_started(patience=None, max_steps=2000, rng=random.Random(seed))
    assert step is not None


@pytest.mark.parametrize("seed", range(20))
def test_random_simulation_never_grants_a_slot_twice_and_every_task_starts(seed):
    rng = random.Random(seed)
    book = SlotBook({"a": range(0, 4), "b": range(4, 8), "c": range(8, 10), "d": range(10, 16)})
    q = Queue(book, patience=rng.choice([None, 0, 5]))
    needs: dict[int, Need] = {}
    for index in range(120):
        kind = rng.random()
        if kind < 0.5:
            need = Need()
        elif kind < 0.75:
            need = Need(cores=rng.randint(2, 6))
        elif kind < 0.9:
            need = Need(ranks=rng.randint(1, 16))
        else:
            nodes = rng.randint(1, 4)
            need = Need(ranks=rng.randint(nodes, 2 * nodes + 2), nodes=nodes)
        if book.check(need) is None:
            needs[index] = need
    pending = sorted(needs)
    rng.shuffle(pending)
    held: dict[int, Grant] = {}
    started: set[int] = set()
    retried: set[int] = set()
    for _ in range(100_000):
        if not pending and not held and not len(q):
            break
        for _ in range(rng.randint(0, 3)):  # tasks become ready in bursts
            if pending:
                index = pending.pop()
                q.push(index, needs[index])
        for index, grant in q.pop_ready():
            _assert_shape(book, needs[index], grant)
            assert index not in held
            held[index] = grant
            started.add(index)
        slots = [s for g in held.values() for s in g.all_slots]
        assert len(slots) == len(set(slots)), "a slot is granted twice"
        assert book.busy == len(slots) and book.free == book.total - len(slots)
        if held and (rng.random() < 0.7 or not pending):
            index = rng.choice(sorted(held))  # finishes in random order
            book.give_back(held.pop(index))
            if index not in retried and rng.random() < 0.1:  # a failed attempt, retried once
                retried.add(index)
                q.push(index, needs[index])
    else:
        pytest.fail("the simulation did not drain")
    assert started == set(needs) and book.free == book.total
