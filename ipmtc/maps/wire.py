"""The channel's messages, as both ends write and check them.

A message is ``[signature, header, *payload frames]``: the header a small pickled
tuple whose first item names the kind, the payload serialized as ipyparallel
serializes an apply's arguments. The signature is an HMAC-SHA256 over every frame
and its length, keyed with a key derived from the cluster's session key (which
both ends already hold) and a per-channel nonce: an unsigned or wrongly signed
message is dropped before anything in it is unpickled. A listener runs a chunk only if
its number (the end of its id) is newer than the last it took: a replayed chunk is
never run twice. Neither end takes a message over :data:`MAX_MESSAGE_BYTES`. In a
cluster that runs CurveZMQ the channel does too, the driver as the server (see
:class:`~.channel.Channel`): encrypted, and only the two ends can take part.

Driver -> listener: ``map`` (a map's :class:`~.spec.MapSpec`, once per engine),
``chunk`` (tasks), ``ping``, ``close``. Listener -> driver: ``hello`` / ``bye``
(with a random token: a replayed one is refused), ``start`` (a task began),
``done`` (a chunk's results), ``failed`` (the chunk could not run), ``lost`` (an
abort came between two tasks), ``nospec`` (the listener let the map's spec go).
"""
from __future__ import annotations

import hashlib
import hmac
import pickle
from typing import Any

PING_EVERY_S = 2.0
ORPHAN_AFTER_S = 30.0  # an idle listener that heard nothing from its driver for this long closes
MAPS_KEPT = 4  # specs a listener keeps (maps running at once from one driver)
_SCHEME = b"ipmtc-channel-1"
# the largest message either end takes (a bigger one drops the connection before anything is read):
# far above any sane chunk, below what would exhaust a node's memory in one message
MAX_MESSAGE_BYTES = 8 << 30


def channel_key(session_key: bytes, nonce: bytes) -> bytes:
    """The HMAC key of one channel: both ends derive it, it never travels."""
    return hmac.new(session_key, _SCHEME + nonce, hashlib.sha256).digest()


def _sign(key: bytes, frames: list) -> bytes:
    h = hmac.new(key, len(frames).to_bytes(4, "big"), hashlib.sha256)
    for f in frames:  # each frame's length too: no moving bytes across frame boundaries
        h.update(len(f).to_bytes(8, "big"))
        h.update(f)
    return h.digest()


def pack(key: bytes, header: tuple, payload: Any = None) -> list:
    """[signature, header, *payload frames]: the payload serialized as ipyparallel itself does."""
    from ipyparallel.serialize import serialize_object

    frames = [pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)]
    if payload is not None:
        frames += serialize_object(payload)
    return [_sign(key, frames), *frames]


def unpack(key: bytes, frames: list) -> tuple[tuple, list] | None:
    """(header, payload frames), or None for a message not signed with ``key``."""
    if len(frames) < 2 or not hmac.compare_digest(frames[0], _sign(key, frames[1:])):
        return None
    return pickle.loads(frames[1]), frames[2:]


def sequence(mid: str) -> int:
    """The number a chunk's id ends with: the driver's messages to one listener go out in its order."""
    return int(mid.rsplit("-", 1)[1])


def payload(frames: list) -> Any:
    """The object a message's payload frames hold."""
    from ipyparallel.serialize import deserialize_object

    return deserialize_object(frames)[0]
