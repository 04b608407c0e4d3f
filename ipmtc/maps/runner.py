"""Engine side: run one chunk of tasks and report each task's outcome.

Runs inside an IPython Parallel engine. One chunk = one message, so short
tasks do not pay per-task messaging. A task's exception is caught and reported
for that task only. With a walltime or a memory limit (``max_rss_mb``), tasks run
in a forked child, the leader of its own process group, that is SIGKILLed --
with every process it started -- at the deadline or once the group's resident
memory passes the limit (checked every :data:`RSS_POLL_S`): that stops C calls
too, the kernel's OOM killer never has to pick the engine, and the engine
stays in service (measured cost: a few ms per chunk, not per task).

SIGINT to the engine (the dispatcher's straggler abort) ends the current task
as ``aborted``; the rest of the chunk comes back as ``notrun``.

What a chunk runs with (the function, walltime, ...) is the map's
:class:`~.spec.MapSpec`; a chunk comes as an apply of :data:`RUN_CHUNK` or over the
channel's listener, which calls :func:`run_chunk` itself.
"""
from __future__ import annotations

import contextlib
import operator
import os
import pickle
import select
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable
from typing import Any

from ..outcomes import ABORTED, MEMORY, NOTRUN, OK, RAISED, WALLTIME
from .spec import MapSpec

__all__ = ["ABORTED", "NOTRUN", "OK", "RAISED", "RUN_CHUNK", "WALLTIME", "error_of", "run_chunk", "where"]

RSS_POLL_S = 0.1  # how often a task's memory is looked at under max_rss_mb
Row = tuple  # (index, status, payload, started, finished)
OnStart = Callable[[int, float], None] | None  # told (task index, start time) as each task starts


def where() -> tuple[str, int]:
    """(node, pid): fake Slurm nodes on one host share a hostname, SLURMD_NODENAME tells them apart."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname(), os.getpid()


def error_of(exc: BaseException) -> dict[str, str]:
    """An exception as it travels back: ename, evalue and the formatted traceback."""
    return {"ename": type(exc).__name__, "evalue": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def _publish_start(index: int, t: float) -> None:
    """Tell the client which task started when (for straggler detection)."""
    try:
        from ipyparallel.datapub import publish_data

        publish_data({"ipmtc_started": (index, t)})
    except Exception:  # not inside an engine (tests) or no iopub: nothing to tell
        pass


def _run_inline(fn: Callable, tasks: list, star: bool, on_start: OnStart) -> list[Row]:
    rows: list[Row] = []
    for pos, (index, item) in enumerate(tasks):
        started = time.time()
        if on_start is not None:
            on_start(index, started)
        try:
            value = fn(*item) if star else fn(item)
            rows.append((index, OK, value, started, time.time()))
        except KeyboardInterrupt:
            rows.append((index, ABORTED, None, started, time.time()))
            rows += [(i, NOTRUN, None, 0.0, 0.0) for i, _ in tasks[pos + 1:]]
            break
        except BaseException as e:  # SystemExit from user code is the task's failure, not ours
            rows.append((index, RAISED, error_of(e), started, time.time()))
    return rows


# ---------------------------------------------------------------- forked child


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack("!Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _child(fn: Callable, tasks: list, star: bool, wfd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides about aborts
    for index, item in tasks:
        started = time.time()
        _send(wfd, ("start", index, started))
        try:
            value = fn(*item) if star else fn(item)
            row = (index, OK, value, started, time.time())
        except BaseException as e:
            row = (index, RAISED, error_of(e), started, time.time())
        try:
            _send(wfd, row)
        except Exception as e:  # result not picklable: report it as the task's error
            _send(wfd, (index, RAISED, error_of(TypeError(f"result cannot be pickled: {e}")), started, time.time()))


class _Reader:
    def __init__(self, fd: int):
        self.fd, self.buf = fd, b""

    def read(self, timeout_s: float | None) -> tuple[str, Any]:
        """('msg', obj) | ('timeout', None) | ('eof', None)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if len(self.buf) >= 8:
                (n,) = struct.unpack("!Q", self.buf[:8])
                if len(self.buf) >= 8 + n:
                    obj = pickle.loads(self.buf[8:8 + n])
                    self.buf = self.buf[8 + n:]
                    return "msg", obj
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return "timeout", None
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return "eof", None
            self.buf += chunk


def _tree(pid: int) -> list[int]:
    """``pid``'s descendants (the processes a task started, and theirs)."""
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # gone already, or psutil cannot look
        return []


def _kill(pid: int) -> int:
    """SIGKILL the task's child and everything it started (its process group and its descendants)."""
    for p in _tree(pid):  # listed first: killed, the child's orphans would move to init
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)  # the child leads its own group (see _fork)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MB (0 when it cannot be read)."""
    try:
        import psutil

        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except Exception:
        return 0.0
    total = 0
    for p in procs:
        with contextlib.suppress(Exception):
            total += p.memory_info().rss
    return total / 2**20


def _fork(fn: Callable, todo: list, star: bool) -> tuple[int, int]:
    """Start a child that runs ``todo``: (its pid, the read end of its pipe)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the engine
        code = 0
        try:
            os.setpgid(0, 0)  # the task's processes form one group: a kill reaches all of them
            os.close(rfd)
            _child(fn, todo, star, wfd)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    return pid, rfd


def _death(status: int) -> str:
    """What ended a child, from its wait status."""
    how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit code {os.WEXITSTATUS(status)}"
    return f"the process running the task died ({how})"


class _Limits:
    """A running task's walltime and memory limit: how long to wait for the child, and which limit it broke."""

    def __init__(self, walltime_s: float | None, max_rss_mb: float | None):
        self.walltime_s, self.max_rss_mb = walltime_s, max_rss_mb

    def wait_s(self, current: tuple[int, float] | None) -> float | None:
        if current is None:
            return None
        waits = [RSS_POLL_S] if self.max_rss_mb is not None else []
        if self.walltime_s is not None:
            waits.append(max(0.0, current[1] + self.walltime_s - time.time()))
        return min(waits) if waits else None

    def broken(self, pid: int, current: tuple[int, float]) -> tuple[str, dict[str, str]] | None:
        """(outcome, error) of a limit the running task broke, or None."""
        if self.walltime_s is not None and time.time() >= current[1] + self.walltime_s:
            return WALLTIME, {"ename": "WalltimeExceeded", "traceback": "",
                              "evalue": f"task ran longer than walltime_s={self.walltime_s:g}"}
        if self.max_rss_mb is not None:
            rss = _rss_mb(pid)
            if rss > self.max_rss_mb:
                return MEMORY, {"ename": "MemoryExceeded", "traceback": "",
                                "evalue": f"the task's processes grew to {rss:.0f} MB, past "
                                          f"max_rss_mb={self.max_rss_mb:g}; it was killed"}
        return None


def _run_forked(fn: Callable, tasks: list, star: bool, limits: _Limits, on_start: OnStart) -> list[Row]:
    rows: list[Row] = []
    todo = list(tasks)
    while todo:
        pid, rfd = _fork(fn, todo, star)
        reader = _Reader(rfd)
        current: tuple[int, float] | None = None
        try:
            while todo:
                kind, msg = reader.read(limits.wait_s(current))
                if kind == "msg" and msg[0] == "start":
                    current = (msg[1], msg[2])
                    if on_start is not None:
                        on_start(msg[1], msg[2])
                elif kind == "msg":
                    rows.append(msg)
                    todo.pop(0)
                    current = None
                elif kind == "timeout":  # a limit to check: stop the task for real, go on with the rest
                    broke = limits.broken(pid, current) if current is not None else None
                    if broke is None:
                        continue
                    _kill(pid)
                    pid = 0
                    rows.append((todo.pop(0)[0], broke[0], broke[1], current[1] if current else time.time(),
                                 time.time()))
                    break
                else:  # the child died under the task (segfault, os._exit, OOM killer)
                    status = os.waitpid(pid, 0)[1]
                    pid = 0
                    started = current[1] if current else time.time()
                    rows.append((todo.pop(0)[0], RAISED, {"ename": "WorkerDied", "evalue": _death(status),
                                 "traceback": ""}, started, time.time()))
                    break
        except KeyboardInterrupt:  # straggler abort from the dispatcher
            if todo:
                rows.append((todo[0][0], ABORTED, None, current[1] if current else time.time(), time.time()))
                rows += [(i, NOTRUN, None, 0.0, 0.0) for i, _ in todo[1:]]
            todo = []
        finally:
            os.close(rfd)
            if pid:
                _kill(pid)
    return rows


def _for_journal(prefix: bytes, tasks: list, rows: list[Row]) -> tuple[bytes, bytes]:
    """The journal's per-task work, done here: the ok rows' keys (:func:`~ipmtc.keys.pack_keys`), and
    the ok rows themselves, each in one pickle.

    Those rows leave ``rows`` (the entries say all they said): a task crosses the
    wire once, the driver unpickles a chunk's results in one call and stores both
    pickles as they are (one journal batch per chunk; it never unpickles the keys).
    Rows left out (an input that cannot be keyed, a result plain pickle cannot
    take) stay in ``rows`` and are recorded by the driver the slow way. One pass
    each: this runs for every chunk of every journaled map.
    """
    from ..keys import pack_keys

    if len(rows) == len(tasks):  # the runners give one row per task, in the tasks' order
        if set(map(_STATUS, rows)) == {OK}:  # the common case, in C-level passes
            ok, rest, inputs = list(rows), [], list(map(_INPUT, tasks))
        else:
            ok = [row for row in rows if row[1] == OK]
            rest = [row for row in rows if row[1] != OK]
            inputs = [task[1] for task, row in zip(tasks, rows) if row[1] == OK]
    else:
        ok = [row for row in rows if row[1] == OK]
        rest = [row for row in rows if row[1] != OK]
        by_index = dict(tasks)
        inputs = [by_index[row[0]] for row in ok]
    keys, bad = pack_keys(prefix, inputs)
    dumps, proto = pickle.dumps, pickle.HIGHEST_PROTOCOL
    blob = None
    if not bad:
        try:
            blob = dumps(ok, protocol=proto)
        except Exception:  # some result plain pickle cannot take
            pass
    if blob is None:  # an input that cannot be keyed, a result plain pickle cannot take: the driver's
        skip, keep, keep_inputs = set(bad), [], []
        for pos, (row, item) in enumerate(zip(ok, inputs)):
            try:
                if pos in skip:
                    raise ValueError(pos)
                dumps(row[2], protocol=proto)
            except Exception:
                rest.append(row)  # recorded by the driver, which says what is wrong
                continue
            keep.append(row)
            keep_inputs.append(item)
        ok = keep
        keys = pack_keys(prefix, keep_inputs)[0]
        blob = dumps(ok, protocol=proto)
    rows[:] = rest
    return keys, blob


_STATUS, _INPUT = operator.itemgetter(1), operator.itemgetter(1)  # a row's status, a task's input


JournalPart = tuple[bytes, bytes]  # (the ok tasks' keys, their rows), pickled
Chunk = tuple[str, int, list[Row], JournalPart | None]  # (node, pid, rows, journal part): what a chunk answers


def run_chunk(spec: MapSpec, tasks: list, on_start: OnStart = None) -> Chunk:
    """Run ``tasks`` = [(index, item), ...] of the map ``spec``; return (node, pid, rows, journal part).

    With ``spec.publish_start`` each task's start is told to ``on_start`` (the channel's listener),
    or else through ipyparallel's data channel, for straggler detection. With
    ``spec.journal_prefix`` the journal part is :func:`_for_journal`'s pair; otherwise None.
    """
    node, pid = where()
    tell = (on_start or _publish_start) if spec.publish_start else None
    if spec.forked:
        rows = _run_forked(spec.fn, tasks, spec.star, _Limits(spec.walltime_s, spec.max_rss_mb), tell)
    else:
        rows = _run_inline(spec.fn, tasks, spec.star, tell)
    prefix = spec.journal_prefix
    return node, pid, rows, (None if prefix is None else _for_journal(prefix, tasks, rows))


class _ChunkRunner:
    """``run_chunk`` as an object: ipyparallel pickles it by reference (a few bytes) where a
    plain function would be sent as its code with every chunk. Applied as ``RUN_CHUNK(spec, tasks)``."""

    def __call__(self, spec: MapSpec, tasks: list) -> Chunk:
        return run_chunk(spec, tasks)

    def __reduce__(self) -> tuple[type, tuple]:
        return (_ChunkRunner, ())


RUN_CHUNK = _ChunkRunner()
