"""Is the controller still there? A map must not wait for ever on a dead hub.

ipyparallel's client has no heartbeat with its controller: when the controller
dies, ``client.ids`` keeps its last value and replies just never come. The
watch asks the hub for its queue status (the small ``queue_request`` that
``Client.queue_status`` sends) once a second, on its own socket and thread, and
remembers when the hub last answered. Over the channel the engines' listeners
keep talking to the driver without the hub; over ipyparallel's applies nothing
moves without it.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import zmq

from .. import _ipp

PROBE_EVERY_S = 1.0
LOST_AFTER_S = 6.0  # silence that means the controller is gone (a busy hub answers well within this)
STOP_SEEN_WITHIN_MS = 100  # the thread looks at its stop flag at least this often


_WATCHES: weakref.WeakKeyDictionary[Any, HubWatch] = weakref.WeakKeyDictionary()


class HubWatch:
    """A background prober of one client's controller."""

    @classmethod
    def for_client(cls, client: Any) -> HubWatch | None:
        """This client's watch (started on first use; closed when the client is collected), or None."""
        watch = _WATCHES.get(client)
        if watch is None or watch._stop.is_set():
            try:
                watch = cls(client)
            except Exception:  # a client this seam does not know: maps go on without the watch
                return None
            _WATCHES[client] = watch
            # never waits: the client may be collected in the middle of another client's map, and a
            # join there would hold that map's loop for up to a probe period
            weakref.finalize(client, watch.close, False)
        return watch

    def __init__(self, client: Any, *, probe_every_s: float = PROBE_EVERY_S):
        self.session = client.session
        self.ctx = zmq.Context()
        self.sock = _ipp.hub_probe_socket(client, self.ctx)
        self.probe_every_s = probe_every_s
        self.last_heard = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ipmtc-hubwatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self.session.send(self.sock, "queue_request", content={"verbose": False, "targets": None})
                deadline = time.monotonic() + self.probe_every_s
                while not self._stop.is_set():
                    left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
                    if not poller.poll(min(left_ms, STOP_SEEN_WITHIN_MS)):
                        if time.monotonic() >= deadline:
                            break  # no answer within the period: ask again
                        continue
                    self.sock.recv_multipart()
                    self.last_heard = time.monotonic()
                if not self._stop.is_set():
                    self._stop.wait(max(0.0, deadline - time.monotonic()))
        except zmq.ZMQError:
            pass  # closed under us
        finally:
            self.sock.close(linger=0)
            self.ctx.term()

    def silent_s(self) -> float:
        """Seconds since the hub last answered."""
        return time.monotonic() - self.last_heard

    def lost(self, after_s: float = LOST_AFTER_S) -> bool:
        return self.silent_s() > after_s

    def close(self, wait: bool = True) -> None:
        """Stop probing; ``wait``: until the thread has closed its socket (within about 0.1 s)."""
        self._stop.set()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
