"""Task-file lines wider than one core, packed onto the allocation's engines (``ipmtc run``).

A line may start with what it needs, in brackets::

    ./serial_prog in1                       one core (the default)
    [cores=4] ./omp_prog in2                4 cores on one node (OMP_NUM_THREADS=4, pinned to them)
    [ranks=8] python mpi_prog.py in3        an MPI program of 8 ranks, one core each, on as few nodes as fit
    [ranks=8 nodes=2] ./mpi_prog in4        ... on exactly 2 nodes (4 + 4)
    [walltime=600] ./prog in5               this line's own walltime in seconds (any line; overrides --walltime-s)

Each engine is one core slot of its node (start the cluster with one engine per core, the default).
The driver keeps the slot bookkeeping (:mod:`ipmtc.slots`): a line runs when its slots are free,
on the first of them (the *lead* engine), while the others are held idle for it; wide lines are
offered first, narrow ones fill the gaps, and a wide line passed over too often gets a reservation.
A K-core line's command is pinned to the K cores of its engines; an MPI line is started with
``srun --overlap`` (inside Slurm) or hydra's ``mpiexec -hosts`` (elsewhere) on exactly its slots,
each rank pinned to one of them (``ipmtc/_rank.py``). Walltime, retries, the journal and draining
work as for single-core lines; the walltime kills the launcher's process group, and with it every rank.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from typing import Any

from . import _ipp
from .errors import TaskFileError
from .notes import LeavingWatch
from .outcomes import CRASHED, LEFT, LOST, OK, RAISED, UNDONE, WALLTIME
from .records import TaskFailure, TaskRecord, from_stored
from .slots import Grant, Need, Queue, SlotBook

_PREFIX = re.compile(r"^\[\s*([a-z]+\s*=[^\]]*)\]\s*(.*)$")  # "[ -f x ]" (shell's test) is not a prefix
KEYS = ("cores", "ranks", "nodes", "walltime")
WHERE_TIMEOUT_S = 30.0  # asking each engine where it runs, at the start
POLL_S = 0.5  # the longest the loop waits for an answer before it looks at the engines again
RANK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_rank.py")


@dataclass(frozen=True)
class Line:
    """One line of a task file: its number, its text (the journal key), the command and what it needs."""

    n: int
    text: str
    cmd: str
    need: Need
    walltime_s: float | None = None  # the line's own [walltime=S]

    @property
    def wide(self) -> bool:
        return self.need.width > 1 or self.need.is_mpi


def parse_line(n: int, text: str) -> Line:
    """``[key=value ...] command`` -> :class:`Line`; :class:`TaskFileError` naming the line if malformed."""
    m = _PREFIX.match(text)
    if not m:
        return Line(n, text, text, Need())
    values: dict[str, int] = {}
    for part in m.group(1).replace(",", " ").split():
        key, eq, value = part.partition("=")
        if key not in KEYS or not eq:
            raise TaskFileError(f"line {n}: {part!r} in [{m.group(1)}] is not KEY=N with KEY one of "
                                f"{', '.join(KEYS)}, e.g. [cores=4] or [ranks=8 nodes=2] or [walltime=600]")
        if not value.isdigit() or int(value) < 1:
            raise TaskFileError(f"line {n}: {key}={value} must be a whole number >= 1")
        values[key] = int(value)
    cmd = m.group(2).strip()
    if not cmd:
        raise TaskFileError(f"line {n}: [{m.group(1)}] is followed by no command")
    if "cores" in values and "ranks" in values:
        raise TaskFileError(f"line {n}: give cores= (one node) or ranks= (MPI), not both")
    if "nodes" in values and "ranks" not in values:
        raise TaskFileError(f"line {n}: nodes= goes with ranks= (an MPI line); a cores= line runs on one node")
    need = Need(cores=values.get("cores", 1), ranks=values.get("ranks", 0), nodes=values.get("nodes"))
    if need.is_mpi and need.nodes and need.nodes > need.ranks:
        raise TaskFileError(f"line {n}: {need.nodes} nodes for {need.ranks} ranks; give at least one rank per node")
    return Line(n, text, cmd, need, float(values["walltime"]) if "walltime" in values else None)


def parse_lines(tasks: Sequence[tuple[int, str]]) -> list[Line]:
    return [parse_line(n, text) for n, text in tasks]


# ---------------------------------------------------------------- engine side


def where() -> dict[str, Any]:
    """Run on each engine: its node (Slurm's name for fake nodes too), host and CPUs."""
    import os
    import socket

    return {"node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "host": socket.gethostname(),
            "cpus": sorted(os.sched_getaffinity(0)), "slurm": bool(os.environ.get("SLURM_JOB_ID")),
            "cores": len([c for c in os.environ.get("IPMTC_ENGINE_CORES", "").split(",") if c]) or 1,
            "gpus": os.environ.get("IPMTC_ENGINE_GPUS", "")}


# what srun reads from its environment: the engine's own step set these (its tasks per node, CPUs per
# task, no GPU, no MPI); an MPI line's step is sized by its own arguments and gets the site's MPI default
SRUN_INHERITED = ("SLURM_CPUS_PER_TASK", "SRUN_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE", "SLURM_CPU_BIND",
                  "SLURM_CPU_BIND_TYPE", "SLURM_CPU_BIND_LIST", "SLURM_CPU_BIND_VERBOSE", "SLURM_GRES", "SLURM_EXACT",
                  "SLURM_MPI_TYPE", "SLURM_OVERCOMMIT", "SLURM_DISTRIBUTION", "SLURM_TRES_PER_TASK",
                  "SLURM_GPUS_PER_TASK", "SLURM_NTASKS", "SLURM_NPROCS")


def launch_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of an MPI line's launcher: the engine's step settings dropped, one thread per rank."""
    out = {k: v for k, v in env.items() if k not in SRUN_INHERITED}
    out["OMP_NUM_THREADS"] = "1"
    return out


def launch_argv(cmd: str, launch: dict[str, Any]) -> list[str]:
    """argv that starts an MPI line's ranks on exactly its slots, each rank pinned (``_rank.py``)."""
    hosts: list[list[Any]] = launch["hosts"]  # [[node, ranks there], ...]
    ranks = sum(c for _, c in hosts)
    wrapper = [sys.executable, "-I", RANK_SCRIPT, launch["cpus_json"], "/bin/sh", "-c", cmd]
    if launch["launcher"] == "srun":
        per_rank = ",".join(node for node, c in hosts for _ in range(c))
        # a step beside the engines' own (which holds every CPU in Slurm's books: --overlap); the slots
        # are ipmtc's to give, so -m arbitrary puts each rank on the node ipmtc chose for it
        return [launch["srun"], "--overlap", "-n", str(ranks), "-N", str(len(hosts)), "-m", "arbitrary",
                "-w", per_rank, "--kill-on-bad-exit=1", *launch.get("mpi", ()), *wrapper]
    return [launch["mpiexec"], "-n", str(ranks), "-hosts", ",".join(f"{n}:{c}" for n, c in hosts), *wrapper]


# ---------------------------------------------------------------- driver side


def _launch(line: Line, grant: Grant, places: dict[int, dict[str, Any]], launcher: str) -> dict[str, Any]:
    """What the lead engine needs to start a wide line on ``grant``'s slots."""
    cpus = {node: sorted({c for s in slots for c in places[s]["cpus"]}) for node, slots in grant.slots}
    if not line.need.is_mpi:
        (node, _), = grant.slots
        return {"kind": "cores", "cpus": cpus[node], "threads": line.need.cores}
    import json

    out: dict[str, Any] = {"kind": "mpi", "launcher": launcher, "hosts": [[n, len(s)] for n, s in grant.slots],
                           # a slot's CPU where its engine is pinned to one; -1: the rank keeps the node's
                           "cpus_json": json.dumps({n: [_one_cpu(places[s]["cpus"]) for s in slots]
                                                    for n, slots in grant.slots}, separators=(",", ":"))}
    if launcher == "srun":
        out["srun"] = shutil.which("srun") or "srun"
        mpi = os.environ.get("IPMTC_SRUN_MPI", "")  # e.g. pmi2 for the mpich wheel where the site's default is pmix
        out["mpi"] = [f"--mpi={mpi}"] if mpi else []
    else:
        from .launch import find_program

        out["mpiexec"] = find_program("mpiexec") or "mpiexec"
    return out


def _one_cpu(cpus: list[int]) -> int:
    return cpus[0] if len(cpus) == 1 else -1


def _launcher(places: dict[int, dict[str, Any]]) -> str:
    """srun inside Slurm (a step of the job), else hydra's mpiexec (PBS, LSF, local)."""
    if all(p.get("slurm") for p in places.values()) and shutil.which("srun"):
        return os.environ.get("IPMTC_MPI_LAUNCHER", "srun")
    return "mpiexec"


def _error_of(exc: BaseException) -> tuple[str, str, str]:
    """(outcome, ename, evalue) of a failed attempt."""
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    return (WALLTIME if ename == "CommandWalltime" else RAISED), ename, evalue


class Packer:
    """The driver's loop for one run of wide lines: slots, queue, answers, retries, journal, drain."""

    def __init__(self, rc: Any, lines: list[Line], items: list[tuple], *, retries: int, journal: Any,
                 key_of: Any, drain_at: float | None, drain_margin_s: float, run_fn: Any, crash_limit: int = 3,
                 engines: list[int] | None = None, progress: bool = False):
        self.rc, self.lines, self.items, self.retries = rc, lines, items, retries
        self.journal, self.key_of, self.run_fn = journal, key_of, run_fn
        self.drain_at, self.drain_margin_s, self.crash_limit = drain_at, drain_margin_s, crash_limit
        ids = list(rc.ids) if engines is None else list(engines)
        try:
            self.places: dict[int, dict[str, Any]] = dict(zip(ids, rc[ids].apply_async(where).get(
                timeout=WHERE_TIMEOUT_S)))
        except Exception as e:
            raise TaskFileError(f"could not ask the engines where they run ({type(e).__name__}); are they busy "
                                "with another run? try again when it ended") from None
        wide_engines = sorted(e for e, p in self.places.items() if p.get("cores", 1) > 1 or p.get("gpus"))
        if wide_engines and any(line.wide for line in lines):
            raise TaskFileError(f"[cores=]/[ranks=] lines need single-core engines (one per core, `ipmtc start` "
                                f"without --cores-per-engine/--gpus-per-engine), but engines {wide_engines[:8]} hold "
                                "more; restart the cluster or use a pool of single-core engines")
        nodes: dict[str, list[int]] = {}
        for eid in sorted(self.places):
            nodes.setdefault(self.places[eid]["node"], []).append(eid)
        self.book = SlotBook(nodes)
        self.queue = Queue(self.book)
        self.launcher = _launcher(self.places)
        self.running: dict[Any, tuple[int, Grant, float]] = {}  # AsyncResult -> (index, grant, sent)
        self.durations: dict[int, list[float]] = {}  # width -> durations seen (drain estimates)
        self.lost: dict[int, int] = {}  # line index -> lead engines that died under it
        # `ipmtc remove` names engines that leave: their slots go (a line on them runs to its end), and a line
        # whose engine left under it runs again, uncharged
        pdir = _ipp.profile_dir_of(rc)
        self.leaving = LeavingWatch(pdir) if pdir else None
        self.left: set[int] = set()
        from .maps.progress import Progress

        self.bar = Progress(progress, None, "commands")
        from .maps.result import MapResult

        self.res = MapResult(ordered=True, n_engines=len(self.places), schedule="packed")
        self.records = [TaskRecord(index=i, key=key_of(items[i])) for i in range(len(lines))]

    def _shape(self) -> str:
        sizes = self.book.size_per_node
        return f"{len(sizes)} node{'s' if len(sizes) != 1 else ''} x {max(sizes.values(), default=0)} engines"

    def run(self) -> Any:
        """Run every line not done in the journal. Lines no node of this cluster can hold are refused first
        (one line naming the first of them), before anything starts."""
        todo = []
        for i, rec in enumerate(self.records):
            hit = self.journal.lookup(rec.key) if self.journal is not None and self.journal.has_records else None
            if hit is not None:
                self._from_journal(i, rec, hit)
            else:
                todo.append(i)
        for i in todo:
            problem = self.book.check(self.lines[i].need)
            if problem:
                raise TaskFileError(f"line {self.lines[i].n}: {problem} (this cluster: {self._shape()}); "
                                    "ask for less or start the cluster on more nodes")
        self.res.started_at = time.time()
        for i in todo:
            self.queue.push(i, self.lines[i].need)
        self.bar.total = len(todo)
        self.bar.open()
        try:
            while len(self.queue) or self.running:
                self._start_ready()
                if not self.running:
                    if len(self.queue):  # nothing runs and nothing can start: the slots are gone
                        self._undone(list(self.queue))
                    break
                done, _ = wait(list(self.running), timeout=POLL_S, return_when=FIRST_COMPLETED)
                for ar in done:
                    self._answered(ar)
                self._follow_engines()
        except KeyboardInterrupt:
            try:  # what still waits on the engines is dropped; running commands end with their engines' abort
                self.rc.abort(list(self.running), block=False)
            except Exception:
                pass
            raise
        finally:
            self.bar.close()
        self.res.records = self.records
        self.res.undone.sort()
        self.res.finished_at = time.time()
        return self.res

    def _draining(self, width: int) -> bool:
        """Inside a batch job: a line that would not end ``drain_margin_s`` before the job does is not started."""
        if self.drain_at is None:
            return False
        seen = self.durations.get(width) or [d for ds in self.durations.values() for d in ds]
        est = sorted(seen)[len(seen) // 2] if seen else 0.0
        return time.time() + est > self.drain_at - self.drain_margin_s

    def _start_ready(self) -> None:
        for index, grant in self.queue.pop_ready():
            if self._draining(self.lines[index].need.width):
                self.book.give_back(grant)
                self._undone([index])
                continue
            line = self.lines[index]
            item = self.items[index]
            if line.wide:
                item = (*item, _launch(line, grant, self.places, self.launcher))
            rec = self.records[index]
            rec.submitted = time.time()
            try:
                ar = self.rc[grant.lead].apply_async(self.run_fn, item)
            except Exception:  # the lead engine left since the last look: its slot goes, the line waits again
                self.book.give_back(grant)
                self.places.pop(grant.lead, None)
                if grant.lead not in self.left:
                    self.book.remove(grant.lead)
                self._again(index, "its engines were lost")
                continue
            self.running[ar] = (index, grant, rec.submitted)

    def _again(self, index: int, why: str) -> None:
        """Back in the queue -- or failed, if what is left of the cluster can no longer hold it."""
        problem = self.book.check(self.lines[index].need)
        if problem is None:
            self.queue.push(index, self.lines[index].need)
        else:
            self._failed(index, CRASHED, "EnginesLost", f"line {self.lines[index].n}: {why}, and {problem}", "")

    def _answered(self, ar: Any) -> None:
        index, grant, sent = self.running.pop(ar)
        self.book.give_back(grant)
        rec = self.records[index]
        place = self.places.get(grant.lead, {})
        md = ar.metadata if isinstance(ar.metadata, dict) else (ar.metadata[0] if ar.metadata else {})
        t0, t1 = md.get("started"), md.get("completed")
        started = t0.timestamp() if t0 is not None else sent
        finished = t1.timestamp() if t1 is not None else time.time()
        rec.engine_id, rec.host, rec.pid = grant.lead, place.get("node"), None
        rec.slots = grant.all_slots if grant.width > 1 else ()
        try:
            value = ar.get(0)
        except Exception as e:
            if (type(e).__name__ == "EngineError" or getattr(e, "ename", "") == "EngineError") and \
                    self.left & set(grant.all_slots):  # an engine removed under it: not a loss, runs again
                rec.history.append((grant.lead, place.get("node"), None, None, LEFT))
                self._again(index, "its engines left")
                return
            if type(e).__name__ == "EngineError" or getattr(e, "ename", "") == "EngineError":
                self.lost[index] = self.lost.get(index, 0) + 1
                rec.history.append((grant.lead, place.get("node"), None, None, LOST))
                if self.lost[index] >= self.crash_limit:  # a line that keeps killing its engine: not forever
                    rec.crashes = self.lost[index]
                    self._failed(index, CRASHED, "EngineCrashes", f"line {self.lines[index].n}: its engine died "
                                 f"{self.lost[index]} times while it ran (crash_limit {self.crash_limit})", "")
                else:
                    rec.resubmits += 1  # its engine died: run it again, no retry spent
                    self._again(index, "its engine died")
                return
            outcome, ename, evalue = _error_of(e)
            rec.attempts += 1
            rec.history.append((grant.lead, place.get("node"), started, finished, outcome))
            rec.started, rec.finished = started, finished
            rec.error = f"{ename}: {evalue}"
            if rec.attempts <= self.retries:
                self._again(index, "it failed")
                return
            self._failed(index, outcome, ename, evalue, getattr(e, "traceback", "") or "")
            return
        if isinstance(value, dict):  # where it ran: every slot it held (the report draws it that wide)
            value = {**value, "engines": list(grant.all_slots), "nodes": [[n, list(s)] for n, s in grant.slots]}
        rec.attempts += 1
        rec.started, rec.finished, rec.outcome, rec.error = started, finished, OK, None
        self.durations.setdefault(self.lines[index].need.width, []).append(finished - started)
        self.bar.tick()
        self.res._set(index, value)
        if self.journal is not None:
            self.journal.add(rec, value, self.items[index], self.key_of)

    def _failed(self, index: int, outcome: str, ename: str, evalue: str, traceback: str) -> None:
        rec = self.records[index]
        rec.outcome, rec.error = outcome, f"{ename}: {evalue}"
        failure = TaskFailure(index=index, item=self.items[index], ename=ename, evalue=evalue, traceback=traceback,
                              engine_id=rec.engine_id, host=rec.host, attempts=rec.attempts)
        self.res.failed.append(failure)
        self.res._set(index, failure)
        self.bar.tick()
        if self.journal is not None:
            self.journal.add(rec, None, self.items[index], self.key_of)

    def _follow_engines(self) -> None:
        """Engines that left give up their slots for good (a running line on them is answered as lost);
        waiting lines that what is left can no longer hold fail, saying why."""
        alive = set(self.rc.ids)
        gone = [eid for eid in self.places if eid not in alive]
        for eid in gone:
            self.places.pop(eid)
            if eid not in self.left:
                self.book.remove(eid)
        if self._follow_leaving() or gone:
            for index, why in self.queue.pop_impossible():
                self._failed(index, CRASHED, "EnginesLost",
                             f"line {self.lines[index].n}: engines were lost, and {why}", "")

    def _follow_leaving(self) -> bool:
        """Engines `ipmtc remove` named give up their slots (read when the file changed); whether any did."""
        leaving = self.leaving.changed() if self.leaving is not None else None
        if leaving is None:
            return False
        now = (leaving & set(self.places)) - self.left
        for eid in now:
            self.book.remove(eid)
        self.left |= now
        return bool(now)

    def _from_journal(self, index: int, rec: TaskRecord, hit: tuple[Any, dict[str, Any]]) -> None:
        value, stored = hit
        from_stored(rec, stored)
        self.res.journal_hits += 1
        if rec.outcome == OK:
            self.res._set(index, value)
            return
        ename, _, evalue = (rec.error or "Error: ").partition(": ")
        failure = TaskFailure(index=index, item=self.items[index], ename=ename, evalue=evalue, traceback="",
                              engine_id=rec.engine_id, host=rec.host, attempts=rec.attempts)
        self.res.failed.append(failure)
        self.res._set(index, failure)

    def _undone(self, indices: list[int]) -> None:
        for i in indices:
            if i in self.queue:
                self.queue.remove(i)
            self.records[i].outcome = UNDONE
            self.res.undone.append(i)
