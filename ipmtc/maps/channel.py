"""A direct channel from the driver to the engines, beside ipyparallel's own.

Every ipyparallel apply costs an engine ~2 ms of CPU when idle (5-10 ms under load:
ipykernel's dispatch, output flushes, busy/idle status, the reply through the hub),
even when the next chunk already waits there; at the start of a map all engines pay
it at once (32 engines on 2 cores: ~130 ms before the last one starts). With 0.3 s
tasks that alone kept ``dynamic_map`` 2-7 % under the zero-overhead schedule.

So each engine gets, once per client, a *listener*: an apply (:func:`attach`)
leaves a ZeroMQ socket connected back to this process on the engine's own event
loop and returns at once. The engine stays a plain engine (``%px``, ``lview.map``
work as before); a chunk that arrives on that socket runs in the engine's main
thread, between its other messages, with the very same chunk runner. The map's
function and settings go to each engine once per map; a chunk is one message each
way. Engines that cannot reach this process (a notebook behind an ssh tunnel) keep
getting applies.

Security: every message is signed with an HMAC key derived from the cluster's
session key (which both ends already hold) and a per-channel nonce; unsigned or
wrongly signed messages are dropped before anything is unpickled.

Lifetime: the driver pings every :data:`PING_EVERY_S`; a listener that hears
nothing for :data:`ORPHAN_AFTER_S` while idle (the driver died or hangs) says
``bye`` and closes, and the driver puts the chunks it had back in line, uncharged.
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import pickle
import secrets
import signal
import socket
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from .. import _ipp
from ..errors import ChannelLost, ChunkFailed

PING_EVERY_S = 2.0
ORPHAN_AFTER_S = 30.0  # an idle listener that heard nothing from its driver for this long closes
MAPS_KEPT = 4  # functions a listener keeps (maps running at once from one driver)
_SCHEME = b"ipmtc-channel-1"
_ids = itertools.count()


def _map_key(session_key: bytes, nonce: bytes) -> bytes:
    return hmac.new(session_key, _SCHEME + nonce, hashlib.sha256).digest()


def _sign(key: bytes, frames: list) -> bytes:
    h = hmac.new(key, len(frames).to_bytes(4, "big"), hashlib.sha256)
    for f in frames:  # each frame's length too: no moving bytes across frame boundaries
        h.update(len(f).to_bytes(8, "big"))
        h.update(f)
    return h.digest()


def _pack(key: bytes, header: tuple, payload: Any = None) -> list:
    """[signature, header, *payload frames]: the payload serialized as ipyparallel itself does."""
    from ipyparallel.serialize import serialize_object

    frames = [pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)]
    if payload is not None:
        frames += serialize_object(payload)
    return [_sign(key, frames), *frames]


def _unpack(key: bytes, frames: list) -> tuple[tuple, list] | None:
    """(header, payload frames), or None for a message not signed with ``key``."""
    if len(frames) < 2 or not hmac.compare_digest(frames[0], _sign(key, frames[1:])):
        return None
    return pickle.loads(frames[1]), frames[2:]


def _payload(frames: list) -> Any:
    from ipyparallel.serialize import deserialize_object

    return deserialize_object(frames)[0]


def driver_ip(client) -> str | None:
    """The address of this process that the engines can reach, or None (use applies).

    The interface this host uses toward the controller: engines reach the
    controller, and a driver in the batch script sits next to it. Set
    ``IPMTC_DRIVER_IP`` to name it, or to ``off`` to always use applies.
    """
    forced = os.environ.get("IPMTC_DRIVER_IP", "").strip()
    if forced:
        return None if _off() else forced
    if getattr(client, "_ssh", False):  # engines behind a tunnel cannot dial back
        return None
    cfg = getattr(client, "_config", None) or {}
    host = str(cfg.get("interface", "")).split("://", 1)[-1].strip("[]")
    if not host or host in ("*", "0.0.0.0"):
        return None
    if host.startswith("127.") or host == "localhost":
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # sends nothing: picks the route's source address
            return s.getsockname()[0]
    except OSError:
        return None


def _off() -> bool:
    return os.environ.get("IPMTC_DRIVER_IP", "").strip().lower() in ("off", "0", "no", "none")


# ---------------------------------------------------------------- engine side

_LISTENERS: dict[str, _Listener] = {}


def attach(address: str, nonce: bytes) -> int:
    """Runs as an apply on an engine: leave a listener for this driver there; return at once."""
    old = _LISTENERS.pop(address, None)
    if old is not None:
        old.close(bye=False)
    listener = _LISTENERS[address] = _Listener(address, nonce)
    return listener.engine_id


class _Attach:
    """:func:`attach` pickled by reference (a few bytes)."""

    def __call__(self, *args):
        return attach(*args)

    def __reduce__(self):
        return (_Attach, ())


ATTACH = _Attach()


class _Listener:
    """One driver's socket on an engine's event loop."""

    def __init__(self, address: str, nonce: bytes):
        from tornado.ioloop import PeriodicCallback
        from zmq.eventloop.zmqstream import ZMQStream

        session_key, self.engine_id, io_loop = _ipp.kernel_parts(_ipp.engine_kernel())
        self.address = address
        self.key = _map_key(session_key, nonce)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = 0  # a send never blocks the engine, even with its driver gone
        self.sock.connect(address)
        self.armed = False  # SIGINT stops a task only while a task runs (not mid-send)
        self.out = _plain(sys.__stdout__), _plain(sys.__stderr__)  # the engine's own output: its log
        self.maps: OrderedDict[str, tuple] = OrderedDict()
        self.heard = time.monotonic()
        self.stream = ZMQStream(self.sock, io_loop)
        self.stream.on_recv(self._on_recv, copy=True)
        self.watch = PeriodicCallback(self._check, 1000)
        io_loop.add_callback(self.watch.start)
        self._send(("hello", self.engine_id, secrets.token_hex(8)))  # the token: a replay is refused

    def _send(self, header: tuple, payload: Any = None) -> None:
        self.sock.send_multipart(_pack(self.key, header, payload))

    def _on_sigint(self, signum, frame) -> None:
        if self.armed:
            raise KeyboardInterrupt

    def _check(self) -> None:
        if time.monotonic() - self.heard > ORPHAN_AFTER_S:
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
        got = _unpack(self.key, frames)
        if got is None:
            return
        self.heard = time.monotonic()
        header, payload = got
        kind = header[0]
        if kind == "map":
            try:
                self.maps[header[1]] = _payload(payload)
            except BaseException as e:  # e.g. fn's module cannot be imported here: its chunks fail
                from .runner import _error

                self.maps[header[1]] = _error(e)
            while len(self.maps) > MAPS_KEPT:
                self.maps.popitem(last=False)
        elif kind == "chunk":
            self._run(header[1], header[2], payload)
            self.heard = time.monotonic()  # a long chunk is not the driver's silence
        elif kind == "close":
            self.close(bye=False)

    def _run(self, mid: str, map_id: str, payload: list) -> None:
        from .runner import _error, run_chunk

        spec = self.maps.get(map_id)
        if spec is None:  # pushed out by other maps: the driver sends it again with the next chunk
            self._send(("nospec", mid, map_id))
            return
        if isinstance(spec, dict):  # the map's function could not be unpickled here
            self._send(("failed", mid), spec)
            return
        fn, star, walltime_s, isolate, publish, journal_prefix = spec

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
            tasks = _payload(payload)
            # what tasks print goes to the engine's log, not through ipykernel to the client, which
            # would file it under the engine's last ipyparallel message and keep it for ever
            sys.stdout, sys.stderr = self.out
            self.armed = True  # a straggler abort (SIGINT) stops the running task
            try:
                out = run_chunk(fn, tasks, star, walltime_s, isolate, on_start if publish else None,
                                journal_prefix)
            finally:
                self.armed = False
        except KeyboardInterrupt:  # the abort came between two tasks: the chunk runs again elsewhere
            self._send(("lost", mid))
            return
        except BaseException as e:  # the chunk could not run at all (e.g. an input cannot be unpickled)
            self._send(("failed", mid), _error(e))
            return
        finally:
            for f in self.out:
                f.flush()
            sys.stdout, sys.stderr = streams
            _restore_fds(fds)
            signal.signal(signal.SIGINT, saved)
        try:
            self.sock.send_multipart(_pack(self.key, ("done", mid), out))
        except Exception:  # a result that cannot be sent is that task's failure, not the chunk's
            self.sock.send_multipart(_pack(self.key, ("done", mid), _with_unsendable_as_errors(out)))


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
        os.dup2(capture, fd)
        os.close(capture)


def _plain(stream):
    """The process's own stream (fd 1/2; while a chunk runs they point at the engine's log)."""
    return open(os.devnull, "w") if stream is None or getattr(stream, "closed", False) else stream


def _with_unsendable_as_errors(out: tuple) -> tuple:
    node, pid, rows, part = out
    fixed = []
    for row in rows:
        try:
            _pack(b"", ("check",), row[2])
            fixed.append(row)
        except Exception as e:
            fixed.append((row[0], "raised", {"ename": "TypeError", "evalue":
                          f"result cannot be sent back: {type(e).__name__}: {e}", "traceback": ""},
                          row[3], row[4]))
    return node, pid, fixed, part


# ---------------------------------------------------------------- driver side


class ChannelResult:
    """A chunk sent over the channel: the parts of an AsyncResult the dispatcher uses."""

    def __init__(self, mid: str, engine_id: int):
        self.msg_ids = [mid]
        self.engine_id = engine_id
        self._metadata = [{"engine_id": engine_id}]
        self.task_started: tuple[int, float] | None = None  # (task index, time) of the task running now
        self._frames: list | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable] = []
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return self._frames is not None or self._error is not None

    def get(self, timeout: float = 0) -> Any:
        if self._error is not None:
            raise self._error
        if self._frames is None:
            raise TimeoutError("chunk not finished")
        return _payload(self._frames)

    def add_done_callback(self, cb: Callable) -> None:
        with self._lock:
            if not self.ready():
                self._callbacks.append(cb)
                return
        cb(self)

    def _set(self, frames: list | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self.ready():
                return
            self._frames, self._error = frames, error
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)


_CHANNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Channel:
    """The driver's end, one per client: a ROUTER socket that one thread owns.

    The dispatcher hands messages to the thread through an inproc socket;
    results come back as :class:`ChannelResult` callbacks.
    """

    def __init__(self, session_key: bytes, ip: str):
        self.nonce = secrets.token_bytes(16)
        self.key = _map_key(session_key, self.nonce)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.router_mandatory = 1  # a chunk for a listener that is gone fails at once: rerun
        try:
            port = self.router.bind_to_random_port(f"tcp://{ip}")
        except zmq.ZMQError:
            self.router.close(0)
            self.ctx.term()
            raise
        self.address = f"tcp://{ip}:{port}"
        inproc = f"inproc://ipmtc-channel-{os.getpid()}-{next(_ids)}"
        self._inbox = self.ctx.socket(zmq.PULL)
        self._inbox.bind(inproc)
        self._outbox = self.ctx.socket(zmq.PUSH)
        self._outbox.connect(inproc)
        self._out_lock = threading.Lock()
        self.results: dict[str, ChannelResult] = {}
        self._seen: set[bytes] = set()  # signatures of hellos and byes: a replayed one is refused
        self.connected: set[int] = set()  # engines whose listener said hello (written by the thread)
        self.asked: set[int] = set()  # engines sent an attach (by the dispatcher)
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ipmtc-channel", daemon=True)
        self._thread.start()

    @classmethod
    def for_client(cls, client) -> Channel | None:
        """This client's channel (made on first use), or None where engines cannot dial back."""
        if _off():
            return None
        ch = _CHANNELS.get(client)
        if ch is not None and not ch._closed:
            return ch
        ip = driver_ip(client)
        if ip is None:
            return None
        try:
            ch = cls(client.session.key, ip)
        except (zmq.ZMQError, OSError):
            return None
        _CHANNELS[client] = ch
        # at exit too (finalize's default): listeners close at once, not after ORPHAN_AFTER_S
        weakref.finalize(client, ch.close)
        return ch

    def _post(self, frames: list) -> None:
        with self._out_lock:
            self._outbox.send_multipart(frames)

    def begin_map(self, spec: tuple) -> str:
        """Register a map's (fn, star, walltime_s, isolate, publish, journal_prefix); sent once per engine."""
        map_id = f"{self.nonce.hex()[:8]}-m{next(self._seq)}"
        self._post([b"map", map_id.encode(), *_pack(self.key, ("map", map_id), spec)])
        return map_id

    def end_map(self, map_id: str) -> None:
        self._post([b"endmap", map_id.encode()])

    def listening(self, engine_id: int) -> bool:
        return not self._closed and engine_id in self.connected

    def submit(self, engine_id: int, map_id: str, tasks: list) -> ChannelResult:
        """Send a chunk; raises what serializing ``tasks`` raises (nothing is sent then)."""
        mid = f"ipmtc-{self.nonce.hex()[:8]}-{next(self._seq)}"
        frames = _pack(self.key, ("chunk", mid, map_id), tasks)
        res = self.results[mid] = ChannelResult(mid, engine_id)
        if self._closed:
            res._set(error=ChannelLost("the channel closed"))
            return res
        self._post([b"chunk", str(engine_id).encode(), map_id.encode(), *frames])
        return res

    def forget(self, mid: str) -> None:
        self.results.pop(mid, None)

    def drop_engine(self, engine_id: int) -> None:
        """An engine is gone: it is neither connected nor asked any more."""
        self.connected.discard(engine_id)
        self.asked.discard(engine_id)

    def close(self) -> None:
        """Tell every listener to close, then shut the socket down."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._post([b"close"])
            self._thread.join(timeout=5.0)
        self._outbox.close(0)
        self.ctx.term()

    # ------------------------------------------------ the thread: owns router and inbox

    def _run(self) -> None:
        idents: dict[int, bytes] = {}
        maps: dict[str, list] = {}  # map id -> its packed spec message
        told: dict[int, set[str]] = {}  # engine -> map ids whose spec it has
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._inbox, zmq.POLLIN)
        next_ping = time.monotonic() + PING_EVERY_S
        ping = _pack(self.key, ("ping",))
        try:
            while True:
                for sock, _ in poller.poll(max(0, int((next_ping - time.monotonic()) * 1000)) + 1):
                    if sock is self.router:
                        msg = self.router.recv_multipart(copy=True)
                        try:
                            self._from_engine(msg, idents, told)
                        except Exception:  # one bad message must not stop the channel
                            pass
                        continue
                    msg = self._inbox.recv_multipart()
                    kind = msg[0]
                    if kind == b"chunk":
                        eid, map_id = int(msg[1]), msg[2].decode()
                        ident = idents.get(eid)
                        if ident is None:  # not (or no longer) listening: run it again elsewhere
                            self._lost(pickle.loads(msg[4])[1])
                            continue
                        try:
                            if map_id not in told.setdefault(eid, set()):
                                self.router.send_multipart([ident, *maps[map_id]])
                                told[eid].add(map_id)
                            self.router.send_multipart([ident, *msg[3:]])
                        except zmq.ZMQError:  # its listener is gone (unreachable identity)
                            self._lost(pickle.loads(msg[4])[1])
                    elif kind == b"map":
                        maps[msg[1].decode()] = msg[2:]
                    elif kind == b"endmap":
                        maps.pop(msg[1].decode(), None)
                        for ids in told.values():
                            ids.discard(msg[1].decode())
                    elif kind == b"close":
                        close = _pack(self.key, ("close",))
                        for ident in idents.values():
                            try:
                                self.router.send_multipart([ident, *close])
                            except zmq.ZMQError:
                                pass
                        self.router.linger = 500  # let the closes go out
                        return
                if time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + PING_EVERY_S
                    for ident in list(idents.values()):
                        try:
                            self.router.send_multipart([ident, *ping])
                        except zmq.ZMQError:
                            pass
        finally:
            self._closed = True
            self.connected.clear()
            self.router.close(0)
            self._inbox.close(0)
            for res in list(self.results.values()):
                res._set(error=ChannelLost("the channel closed"))

    def _lost(self, mid: str) -> None:
        res = self.results.get(mid)
        if res is not None:
            res._set(error=ChannelLost(f"engine {res.engine_id} stopped listening"))

    def _from_engine(self, msg: list, idents: dict[int, bytes], told: dict[int, set[str]]) -> None:
        ident, frames = msg[0], msg[1:]
        got = _unpack(self.key, frames)
        if got is None:
            return  # not one of our listeners
        header, payload = got
        kind = header[0]
        if kind in ("hello", "bye"):
            if frames[0] in self._seen:
                return
            self._seen.add(frames[0])
        if kind == "done":
            res = self.results.get(header[1])
            if res is not None:
                res._set(frames=payload)
        elif kind == "start":
            res = self.results.get(header[1])
            if res is not None:
                res.task_started = (header[2], header[3])
        elif kind == "failed":
            res = self.results.get(header[1])
            if res is not None:
                res._set(error=ChunkFailed(_payload(payload)))
        elif kind == "lost":
            self._lost(header[1])
        elif kind == "nospec":  # the listener let the map's function go: send it with the next chunk
            eid = next((e for e, i in idents.items() if i == ident), None)
            if eid is not None:
                told.get(eid, set()).discard(header[2])
            self._lost(header[1])
        elif kind == "hello":
            eid = int(header[1])
            idents[eid] = ident
            told.pop(eid, None)
            self.connected.add(eid)
        elif kind == "bye":
            eid = int(header[1])
            idents.pop(eid, None)
            told.pop(eid, None)
            self.drop_engine(eid)
            for mid, res in list(self.results.items()):
                if res.engine_id == eid:
                    self._lost(mid)
