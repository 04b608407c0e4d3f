"""The driver's end of a direct channel to the engines, beside ipyparallel's own.

Every ipyparallel apply costs an engine ~2 ms of CPU when idle (5-10 ms under load:
ipykernel's dispatch, output flushes, busy/idle status, the reply through the hub),
even when the next chunk already waits there; at the start of a map all engines pay
it at once (32 engines on 2 cores: ~130 ms before the last one starts). With 0.3 s
tasks that alone kept ``dynamic_map`` 2-7 % under the zero-overhead schedule.

So each engine gets, once per client, a *listener* (:mod:`.listener`, the engine's
end): an apply of :data:`~.listener.ATTACH` leaves a ZeroMQ socket connected back to
this process on the engine's own event loop and returns at once. The map's
:class:`~.spec.MapSpec` goes to each engine once per map; a chunk is one message
each way (:mod:`.wire`: signed with a key derived from the cluster's session key).
Engines that cannot reach this process (a notebook behind an ssh tunnel) keep
getting applies.

Lifetime: the driver pings every :data:`~.wire.PING_EVERY_S`; a listener that hears
nothing for :data:`~.wire.ORPHAN_AFTER_S` while idle (the driver died or hangs) says
``bye`` and closes, and the driver puts the chunks it had back in line, uncharged.
"""
from __future__ import annotations

import itertools
import os
import pickle
import secrets
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import _ipp
from ..errors import ChannelLost, ChunkFailed
from . import wire
from .listener import _LISTENERS, ATTACH, attach  # noqa: F401  (their old home; engines import listener)
from .spec import MapSpec
from .wire import MAPS_KEPT, ORPHAN_AFTER_S, PING_EVERY_S  # noqa: F401  (their old home)

_pack, _unpack, _payload = wire.pack, wire.unpack, wire.payload  # their old names
_ids = itertools.count()


def driver_ip(client) -> str | None:
    """The address of this process that the engines can reach, or None (use applies).

    The interface this host uses toward the controller: engines reach the
    controller, and a driver in the batch script sits next to it. Set
    ``IPMTC_DRIVER_IP`` to name it, or to ``off`` to always use applies.
    """
    forced = os.environ.get("IPMTC_DRIVER_IP", "").strip()
    if forced:
        return None if _off() else forced
    host = _ipp.controller_host(client)  # None behind an ssh tunnel: engines cannot dial back
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

    @property
    def error(self) -> BaseException | None:
        """Why the chunk has no answer (once ready), or None."""
        return self._error

    def get(self, timeout: float = 0) -> Any:
        if self._error is not None:
            raise self._error
        if self._frames is None:
            raise TimeoutError("chunk not finished")
        return wire.payload(self._frames)

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

    def __init__(self, session_key: bytes, ip: str, curve: bool = False):
        self.nonce = secrets.token_bytes(16)
        self.key = wire.channel_key(session_key, self.nonce)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.router_mandatory = 1  # a chunk for a listener that is gone fails at once: rerun
        self.router.maxmsgsize = wire.MAX_MESSAGE_BYTES
        # with a curve cluster the channel is curve too, this process the server: a listener checks
        # this key pair's public half (it came over ipyparallel's encrypted sockets), so it never hands
        # results to whoever binds this port after this process is gone; nobody without it can connect
        self.server_key: bytes | None = None
        if curve:
            public, secret = zmq.curve_keypair()
            self.router.curve_secretkey = secret
            self.router.curve_publickey = public
            self.router.curve_server = True
            self.server_key = public
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
        self.gone: set[int] = set()  # engines whose connection dropped without a bye (died)
        self.asked: set[int] = set()  # engines sent an attach (by the dispatcher)
        # msg ids of this client's attach applies, answered but not waited for: the next purge drops them
        self.late_purge: deque[str] = deque()
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ipmtc-channel", daemon=True)
        self._thread.start()

    @classmethod
    def for_client(cls, client: Any) -> Channel | None:
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
            ch = cls(client.session.key, ip, curve=_ipp.uses_curve(client))
        except (zmq.ZMQError, OSError):
            return None
        _CHANNELS[client] = ch
        # at exit too (finalize's default): listeners close at once, not after ORPHAN_AFTER_S
        weakref.finalize(client, ch.close)
        return ch

    def attach(self, client: Any, engines: list[int]) -> None:
        """Ask ``engines`` (once per client) to listen: one apply for all, answered at once, not waited for."""
        from ipyparallel.error import NoEnginesRegistered

        engines = [e for e in engines if e not in self.asked]
        if not engines:
            return
        try:
            ar = client[engines].apply_async(ATTACH, self.address, self.nonce, self.server_key)
        except (IndexError, NoEnginesRegistered):
            return  # one is gone already: supervision notices, the next map asks the others
        self.asked.update(engines)
        late = self.late_purge
        ar.add_done_callback(lambda _f: late.extend(ar.msg_ids))  # nothing to wait for

    def take_late_purge(self) -> list[str]:
        """The answered attach applies' msg ids, for the hub to forget (each handed out once)."""
        out = []
        while self.late_purge:
            out.append(self.late_purge.popleft())
        return out

    def _post(self, frames: list) -> None:
        with self._out_lock:
            self._outbox.send_multipart(frames)

    def begin_map(self, spec: MapSpec) -> str:
        """Register a map's spec (sent to each engine once, with its first chunk); its map id."""
        map_id = f"{self.nonce.hex()[:8]}-m{next(self._seq)}"
        self._post([b"map", map_id.encode(), *wire.pack(self.key, ("map", map_id), spec)])
        return map_id

    def end_map(self, map_id: str) -> None:
        self._post([b"endmap", map_id.encode()])

    def listening(self, engine_id: int) -> bool:
        return not self._closed and engine_id in self.connected

    def submit(self, engine_id: int, map_id: str, tasks: list) -> ChannelResult:
        """Send a chunk; raises what serializing ``tasks`` raises (nothing is sent then)."""
        mid = f"ipmtc-{self.nonce.hex()[:8]}-{next(self._seq)}"
        frames = wire.pack(self.key, ("chunk", mid, map_id), tasks)
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
        idents: dict[int, bytes] = {}  # engine -> its listener's identity
        maps: dict[str, list] = {}  # map id -> its packed spec message
        told: dict[int, set[str]] = {}  # engine -> map ids whose spec it has
        # a listener's connection that drops without a bye is an engine that died: the socket's
        # monitor tells at once (by file descriptor; hellos tell which fd is whose), also while the
        # controller, whose registry tells engine loss otherwise, is gone
        monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        fds: dict[int, int] = {}  # connection fd -> engine
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._inbox, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        next_ping = time.monotonic() + PING_EVERY_S
        ping = wire.pack(self.key, ("ping",))
        try:
            while True:
                for sock, _ in poller.poll(max(0, int((next_ping - time.monotonic()) * 1000)) + 1):
                    if sock is self.router:
                        self._receive(self.router.recv_multipart(copy=False), idents, told, fds)
                    elif sock is monitor:
                        event = recv_monitor_message(monitor)
                        # what the peer sent before its connection dropped (a bye) comes first
                        while self.router.poll(0):
                            self._receive(self.router.recv_multipart(copy=False), idents, told, fds)
                        eid = fds.pop(event["value"], None)
                        if eid is not None:
                            self._disconnected(eid, idents, told)
                    elif not self._from_driver(self._inbox.recv_multipart(), idents, maps, told):
                        return
                if time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + PING_EVERY_S
                    self._to_all(idents, ping)
        finally:
            self._closed = True
            self.connected.clear()
            self.router.disable_monitor()
            monitor.close(0)
            self.router.close(0)
            self._inbox.close(0)
            for res in list(self.results.values()):
                res._set(error=ChannelLost("the channel closed"))

    def _receive(self, frames: list, idents: dict[int, bytes], told: dict[int, set[str]],
                 fds: dict[int, int]) -> None:
        try:
            eid = self._from_engine([f.bytes for f in frames], idents, told)
            if eid is not None:  # a hello: remember its connection
                fds[frames[-1].get(zmq.SRCFD)] = eid
        except Exception:  # one bad message must not stop the channel
            pass

    def _to_all(self, idents: dict[int, bytes], frames: list) -> None:
        for ident in list(idents.values()):
            try:
                self.router.send_multipart([ident, *frames])
            except zmq.ZMQError:
                pass

    def _from_driver(self, msg: list, idents: dict[int, bytes], maps: dict[str, list],
                     told: dict[int, set[str]]) -> bool:
        """Route one message the dispatcher posted; False once the channel is to close."""
        kind = msg[0]
        if kind == b"chunk":
            eid, map_id = int(msg[1]), msg[2].decode()
            ident = idents.get(eid)
            if ident is None or map_id not in maps:  # not (or no longer) listening, or an ended map's
                self._lost(pickle.loads(msg[4])[1])  # chunk: run it again elsewhere (or not at all)
                return True
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
            self._to_all(idents, wire.pack(self.key, ("close",)))
            self.router.linger = 500  # let the closes go out
            return False
        return True

    def _lost(self, mid: str, engine_died: bool = False) -> None:
        res = self.results.get(mid)
        if res is not None:
            why = "died" if engine_died else "stopped listening"
            res._set(error=ChannelLost(f"engine {res.engine_id} {why}", engine_died=engine_died))

    def _disconnected(self, eid: int, idents: dict[int, bytes], told: dict[int, set[str]]) -> None:
        """A listener's connection dropped without a bye: its engine is gone, its chunks are lost with it."""
        if eid not in idents:
            return  # it said bye first
        idents.pop(eid, None)
        told.pop(eid, None)
        self.drop_engine(eid)
        self.gone.add(eid)
        for mid, res in list(self.results.items()):
            if res.engine_id == eid:
                self._lost(mid, engine_died=True)

    def _from_engine(self, msg: list, idents: dict[int, bytes], told: dict[int, set[str]]) -> int | None:
        ident, frames = msg[0], msg[1:]
        got = wire.unpack(self.key, frames)
        if got is None:
            return None  # not one of our listeners
        header, payload = got
        kind = header[0]
        if kind in ("hello", "bye"):
            if frames[0] in self._seen:
                return None
            self._seen.add(frames[0])
        if kind in ("done", "start", "failed"):
            res = self.results.get(header[1])
            if res is None:
                return None
            if kind == "done":
                res._set(frames=payload)
            elif kind == "start":
                res.task_started = (header[2], header[3])
            else:
                res._set(error=ChunkFailed(wire.payload(payload)))
        elif kind == "lost":
            self._lost(header[1])
        elif kind == "nospec":  # the listener let the map's spec go: send it with the next chunk
            eid = next((e for e, i in idents.items() if i == ident), None)
            if eid is not None:
                told.get(eid, set()).discard(header[2])
            self._lost(header[1])
        elif kind == "hello":
            eid = int(header[1])
            idents[eid] = ident
            told.pop(eid, None)
            self.gone.discard(eid)  # listening again (it only closed its listener)
            self.connected.add(eid)
            return eid
        elif kind == "bye":
            eid = int(header[1])
            idents.pop(eid, None)
            told.pop(eid, None)
            self.drop_engine(eid)
            for mid, res in list(self.results.items()):
                if res.engine_id == eid:
                    self._lost(mid)
        return None
