"""Engine side: run one chunk of tasks and report each task's outcome.

Runs inside an IPython Parallel engine. One chunk = one message, so short
tasks do not pay per-task messaging. A task's exception is caught and reported
for that task only. With a walltime, tasks run in a forked child that is
SIGKILLed at the deadline: that stops C calls too, and the engine itself is
unharmed and stays in service (measured cost: a few ms per chunk, not per task).

SIGINT to the engine (the dispatcher's straggler abort) ends the current task
as ``aborted``; the rest of the chunk comes back as ``notrun``.

What a chunk runs with (the function, walltime, ...) is the map's
:class:`~.spec.MapSpec`; a chunk comes as an apply of :data:`RUN_CHUNK` or over the
channel's listener, which calls :func:`run_chunk` itself.
"""
from __future__ import annotations

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

from ..outcomes import ABORTED, NOTRUN, OK, RAISED, WALLTIME
from .spec import MapSpec

__all__ = ["ABORTED", "NOTRUN", "OK", "RAISED", "RUN_CHUNK", "WALLTIME", "error_of", "run_chunk", "where"]

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


def _kill(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return os.waitpid(pid, 0)[1]


def _fork(fn: Callable, todo: list, star: bool) -> tuple[int, int]:
    """Start a child that runs ``todo``: (its pid, the read end of its pipe)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the engine
        code = 0
        try:
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


def _run_forked(fn: Callable, tasks: list, star: bool, walltime_s: float | None, on_start: OnStart) -> list[Row]:
    rows: list[Row] = []
    todo = list(tasks)
    while todo:
        pid, rfd = _fork(fn, todo, star)
        reader = _Reader(rfd)
        current: tuple[int, float] | None = None
        try:
            while todo:
                timeout = None if current is None or walltime_s is None else \
                    max(0.0, current[1] + walltime_s - time.time())
                kind, msg = reader.read(timeout)
                if kind == "msg" and msg[0] == "start":
                    current = (msg[1], msg[2])
                    if on_start is not None:
                        on_start(msg[1], msg[2])
                elif kind == "msg":
                    rows.append(msg)
                    todo.pop(0)
                    current = None
                elif kind == "timeout":  # walltime: stop the task for real, go on with the rest
                    _kill(pid)
                    pid = 0
                    rows.append((todo[0][0], WALLTIME, {"ename": "WalltimeExceeded",
                                 "evalue": f"task ran longer than walltime_s={walltime_s:g}", "traceback": ""},
                                 current[1] if current else time.time(), time.time()))
                    todo.pop(0)
                    break
                else:  # the child died under the task (segfault, os._exit, OOM killer)
                    status = os.waitpid(pid, 0)[1]
                    pid = 0
                    started = current[1] if current else time.time()
                    rows.append((todo[0][0], RAISED, {"ename": "WorkerDied", "evalue": _death(status),
                                 "traceback": ""}, started, time.time()))
                    todo.pop(0)
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


def _for_journal(prefix: bytes, tasks: list, rows: list[Row]) -> bytes:
    """The journal's per-task work, done here: one pickle of (key, index, started, finished,
    result) for the ok rows.

    Those rows leave ``rows`` (the entries say all they said): a task crosses the
    wire once, the driver unpickles a chunk's results in one call and stores these
    bytes as they are (one journal batch per chunk). Rows left out (an input that
    cannot be keyed, a result plain pickle cannot take) stay in ``rows`` and are
    recorded by the driver the slow way.
    """
    from ..keys import keys_for

    items = dict(tasks)
    ok = [pos for pos, row in enumerate(rows) if row[1] == OK]
    keys = keys_for(prefix, [items[rows[pos][0]] for pos in ok])
    out = [(key, rows[pos][0], rows[pos][3], rows[pos][4], rows[pos][2]) for pos, key in zip(ok, keys)
           if key is not None]
    dumps, proto = pickle.dumps, pickle.HIGHEST_PROTOCOL
    try:
        blob = dumps(out, protocol=proto)
    except Exception:  # some result plain pickle cannot take: leave those to ipyparallel
        keep = []
        for entry in out:
            try:
                dumps(entry[4], protocol=proto)
                keep.append(entry)
            except Exception:
                pass
        out = keep
        blob = dumps(out, protocol=proto)
    sent = {entry[1] for entry in out}
    rows[:] = [row for row in rows if row[1] != OK or row[0] not in sent]
    return blob


Chunk = tuple[str, int, list[Row], bytes | None]  # (node, pid, rows, journal part): what a chunk answers


def run_chunk(spec: MapSpec, tasks: list, on_start: OnStart = None) -> Chunk:
    """Run ``tasks`` = [(index, item), ...] of the map ``spec``; return (node, pid, rows, journal part).

    With ``spec.publish_start`` each task's start is told to ``on_start`` (the channel's listener),
    or else through ipyparallel's data channel, for straggler detection. With
    ``spec.journal_prefix`` the journal part is :func:`_for_journal`'s bytes; otherwise None.
    """
    node, pid = where()
    tell = (on_start or _publish_start) if spec.publish_start else None
    if spec.forked:
        rows = _run_forked(spec.fn, tasks, spec.star, spec.walltime_s, tell)
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
