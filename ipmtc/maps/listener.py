"""The engine's end of the channel: a listener on the engine's own event loop.

An apply of :data:`ATTACH` (once per client, see :meth:`.channel.Channel.attach`)
leaves a ZeroMQ DEALER socket connected back to the driver's process and returns
at once. The engine stays a plain engine (``%px``, ``lview.map`` work as before);
a chunk that arrives on that socket runs in the engine's main thread, between its
other messages, with the very same chunk runner as an apply
(:func:`.runner.run_chunk`). What tasks print, from Python or from C, goes to the
engine's own log while a chunk runs, not through ipykernel to the client.

A listener that hears nothing from its driver for :data:`.wire.ORPHAN_AFTER_S`
while idle (the driver died or hangs) says ``bye`` and closes.

Both ends run the same code: the driver sends :data:`ATTACH` pickled by reference
to this module (``ipmtc.maps.listener``).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import time
from collections import OrderedDict
from typing import Any

import zmq

from .. import _ipp
from ..outcomes import RAISED
from . import wire
from .spec import MapSpec

_LISTENERS: dict[str, _Listener] = {}  # driver address -> its listener on this engine


def attach(address: str, nonce: bytes, server_key: bytes | None = None) -> int:
    """Runs as an apply on an engine: leave a listener for this driver there; return at once.

    ``server_key``: the driver's CurveZMQ public key (a curve cluster): the connection is
    encrypted, and made only to the process that holds the matching secret key.
    """
    old = _LISTENERS.pop(address, None)
    if old is not None:
        old.close(bye=False)
    listener = _LISTENERS[address] = _Listener(address, nonce, server_key)
    return listener.engine_id


class _Attach:
    """:func:`attach` pickled by reference (a few bytes)."""

    def __call__(self, *args: Any) -> int:
        return attach(*args)

    def __reduce__(self) -> tuple[type, tuple]:
        return (_Attach, ())


ATTACH = _Attach()


class _Listener:
    """One driver's socket on an engine's event loop."""

    def __init__(self, address: str, nonce: bytes, server_key: bytes | None = None):
        from tornado.ioloop import PeriodicCallback
        from zmq.eventloop.zmqstream import ZMQStream

        session_key, self.engine_id, io_loop = _ipp.kernel_parts(_ipp.engine_kernel())
        self.address = address
        self.key = wire.channel_key(session_key, nonce)
        ctx: zmq.Context = zmq.Context.instance()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = 0  # a send never blocks the engine, even with its driver gone
        self.sock.maxmsgsize = wire.MAX_MESSAGE_BYTES
        if server_key:
            public, secret = zmq.curve_keypair()  # this end's own, thrown away with the socket
            self.sock.curve_serverkey = server_key
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
        self.sock.connect(address)
        self.last_seq = -1  # the driver numbers its messages: one not newer than the last is a replay
        self.armed = False  # SIGINT stops a task only while a task runs (not mid-send)
        self.out = _plain(sys.__stdout__), _plain(sys.__stderr__)  # the engine's own output: its log
        self.maps: OrderedDict[str, MapSpec | dict[str, str]] = OrderedDict()  # a dict: why it failed
        self.heard = time.monotonic()
        self.last_chunk = 0.0  # when the last chunk ended (an engine asked to leave waits for a quiet spell)
        self.stream = ZMQStream(self.sock, io_loop)
        self.stream.on_recv(self._on_recv, copy=True)
        self.watch = PeriodicCallback(self._check, 1000)
        io_loop.add_callback(self.watch.start)
        self._send(("hello", self.engine_id, secrets.token_hex(8)))  # the token: a replay is refused

    def _send(self, header: tuple, payload: Any = None) -> None:
        self.sock.send_multipart(wire.pack(self.key, header, payload))

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.armed:
            raise KeyboardInterrupt

    def _check(self) -> None:
        if time.monotonic() - self.heard > wire.ORPHAN_AFTER_S:
            self.close(bye=True)

    def close(self, bye: bool) -> None:
        if _LISTENERS.get(self.address) is self:
            del _LISTENERS[self.address]
        self.watch.stop()
        if bye:  # the driver, if it comes back, puts what it sent here back in line
            self.sock.linger = 1000
            try:
                self._send(("bye", self.engine_id, secrets.token_hex(8)))
            except zmq.ZMQError:
                pass
        self.stream.close()

    def _on_recv(self, frames: list) -> None:
        got = wire.unpack(self.key, frames)
        if got is None:
            return
        self.heard = time.monotonic()
        header, payload = got
        kind = header[0]
        if kind == "map":
            try:
                self.maps[header[1]] = wire.payload(payload)
            except BaseException as e:  # e.g. fn's module cannot be imported here: its chunks fail
                from .runner import error_of

                self.maps[header[1]] = error_of(e)
            while len(self.maps) > wire.MAPS_KEPT:
                self.maps.popitem(last=False)
        elif kind == "chunk":
            seq = wire.sequence(header[1])
            if seq <= self.last_seq:  # a chunk already taken (a replay): never run twice
                return
            self.last_seq = seq
            self._run(header[1], header[2], payload)
            self.heard = self.last_chunk = time.monotonic()  # a long chunk is not the driver's silence
        elif kind == "close":
            self.close(bye=False)

    def _run(self, mid: str, map_id: str, payload: list) -> None:
        """Run one chunk and answer ``done`` (or ``failed``, ``lost``, ``nospec``)."""
        from .runner import error_of

        spec = self.maps.get(map_id)
        if spec is None:  # pushed out by other maps: the driver sends it again with the next chunk
            self._send(("nospec", mid, map_id))
            return
        if isinstance(spec, dict):  # the map's function could not be unpickled here
            self._send(("failed", mid), spec)
            return
        try:
            out = self._execute(mid, spec, payload)
        except KeyboardInterrupt:  # the abort came between two tasks: the chunk runs again elsewhere
            self._send(("lost", mid))
            return
        except BaseException as e:  # the chunk could not run at all (e.g. an input cannot be unpickled)
            self._send(("failed", mid), error_of(e))
            return
        try:
            self._send(("done", mid), out)
        except Exception:  # a result that cannot be sent is that task's failure, not the chunk's
            self._send(("done", mid), _with_unsendable_as_errors(out))

    def _execute(self, mid: str, spec: MapSpec, payload: list) -> tuple:
        """``run_chunk`` with SIGINT armed and the tasks' output (Python and fds 1/2) sent to the log."""
        from .runner import run_chunk

        def on_start(index: int, t: float) -> None:
            self.armed = False  # an abort now must not cut a message in half
            try:
                self._send(("start", mid, index, t))
            finally:
                self.armed = True

        saved = signal.getsignal(signal.SIGINT)
        streams = sys.stdout, sys.stderr
        fds = _fds_to_log(streams)
        self.armed = False
        signal.signal(signal.SIGINT, self._on_sigint)
        try:
            tasks = wire.payload(payload)
            # what tasks print goes to the engine's log, not through ipykernel to the client, which
            # would file it under the engine's last ipyparallel message and keep it for ever
            sys.stdout, sys.stderr = self.out
            self.armed = True  # a straggler abort (SIGINT) stops the running task
            try:
                return run_chunk(spec, tasks, on_start)
            finally:
                self.armed = False
        finally:
            # each step on its own: a log on a full disk (or quota) must not keep the chunk from being
            # answered, nor leave the engine redirected or deaf to SIGINT
            for f in self.out:
                with contextlib.suppress(Exception):
                    f.flush()
            sys.stdout, sys.stderr = streams
            with contextlib.suppress(Exception):
                _restore_fds(fds)
            signal.signal(signal.SIGINT, saved)


def _fds_to_log(kernel_streams: tuple) -> list[tuple[int, int]]:
    """Point fds 1 and 2 back at the engine's own output while a chunk runs, so that what C code
    writes there is not published by ipykernel's capture; [(fd, the capture's end), ...]."""
    moved = []
    for fd, stream in zip((1, 2), kernel_streams):
        original = _ipp.captured_fd_copy(stream)
        if original is not None:
            moved.append((fd, os.dup(fd)))
            os.dup2(original, fd)
    return moved


def _restore_fds(moved: list[tuple[int, int]]) -> None:
    for fd, capture in moved:
        try:
            os.dup2(capture, fd)
        finally:
            os.close(capture)


def _plain(stream: Any) -> Any:
    """The process's own stream (fd 1/2; while a chunk runs they point at the engine's log)."""
    return open(os.devnull, "w") if stream is None or getattr(stream, "closed", False) else stream


def _with_unsendable_as_errors(out: tuple) -> tuple:
    node, pid, rows, part = out
    fixed = []
    for row in rows:
        try:
            wire.pack(b"", ("check",), row[2])
            fixed.append(row)
        except Exception as e:
            fixed.append((row[0], RAISED, {"ename": "TypeError", "evalue":
                          f"result cannot be sent back: {type(e).__name__}: {e}", "traceback": ""},
                          row[3], row[4]))
    return node, pid, fixed, part
