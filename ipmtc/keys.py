"""Task keys: what identifies a task in a journal, the same in every process.

A key names the function (module + qualified name, :func:`function_id`) and the
input, by a canonical encoding of it (:func:`_encode`). A short printable
encoding (an int, a float, a short tuple of them...) is the key itself, after a
32-bit tag of the function (``"1a2b3c4d=i42;"``): no hash to compute, a few
bytes to store. Any other input is keyed by a 128-bit blake2b hash of the
function's identity and the encoding (32 hex digits, never holding ``=``). A
journal holds the tasks of one function only (another's is refused), so the
tag only keeps keys of different functions apart where they meet.
The maps' default key is worked out on the engines (:func:`keys_for`, called by
the chunk runner) or in the driver (:func:`key_function`); both give
:func:`task_key`'s result. Kept apart from the journal's storage so that the
engines import only this (no sqlite).
"""
from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Callable
from typing import Any

from .errors import JournalError


def function_id(fn: Callable) -> str:
    """``module:qualname`` of a function, method, callable object or ``functools.partial``."""
    if isinstance(fn, functools.partial):
        inner = function_id(fn.func)
        try:
            bound = _encode((fn.args, fn.keywords))
        except JournalError:
            bound = repr((fn.args, fn.keywords)).encode()
        return f"{inner}+partial:{hashlib.blake2b(bound, digest_size=8).hexdigest()}"
    qual = getattr(fn, "__qualname__", None)
    if qual is None:  # a callable object: its class names it
        qual = type(fn).__qualname__
        mod = type(fn).__module__
    else:
        mod = getattr(fn, "__module__", None) or "__main__"
    return f"{mod}:{qual}"


def _encode(obj: Any) -> bytes:
    """Canonical bytes of a task input: equal inputs give equal bytes in any process."""
    t = type(obj)
    if t is int:
        return b"i%d;" % obj
    if t is str:
        b = obj.encode("utf-8", "surrogatepass")
        return b"s%d:" % len(b) + b
    if t is tuple:
        return b"(" + b"".join(_encode(x) for x in obj) + b")"
    if t is float:
        return b"f" + repr(obj).encode() + b";"
    if obj is None:
        return b"N"
    if t is bool:
        return b"T" if obj else b"F"
    if t is bytes:
        return b"b%d:" % len(obj) + obj
    if t is list:
        return b"[" + b"".join(_encode(x) for x in obj) + b"]"
    if t is dict:
        return b"{" + b"".join(sorted(_encode(k) + _encode(v) for k, v in obj.items())) + b"}"
    if t is set or t is frozenset:
        return b"<" + b"".join(sorted(_encode(x) for x in obj)) + b">"
    try:
        data = pickle.dumps(obj, protocol=4)
    except Exception as e:
        raise JournalError(f"cannot make a journal key for the task input {obj!r:.80} ({type(e).__name__}: "
                           f"{e}); pass key=... to name tasks yourself") from None
    return b"p%d:" % len(data) + data


INLINE_MAX = 32  # encodings up to this long (printable ASCII) are keys as they are


def _tag(prefix: bytes) -> str:
    return hashlib.blake2b(prefix, digest_size=4).hexdigest()


def _key(prefix: bytes, tag: str, enc: bytes) -> str:
    if len(enc) <= INLINE_MAX and enc.isascii():
        text = enc.decode("ascii")
        if text.isprintable():
            return f"{tag}={text}"
    return hashlib.blake2b(prefix + enc, digest_size=16).hexdigest()


def _hash(prefix: bytes, enc: bytes) -> str:
    return _key(prefix, _tag(prefix), enc)


def _prefix(fid: str) -> bytes:
    return fid.encode() + b"\0"


def key_prefix(fn: Callable) -> bytes:
    """What :func:`keys_for` needs to key inputs of ``fn`` (sent to the engines with each chunk)."""
    return _prefix(function_id(fn))


def key_for(fid: str, item: Any) -> str:
    """The key of input ``item`` in a map of the function whose :func:`function_id` is ``fid``."""
    return _hash(_prefix(fid), _encode(item))


def task_key(fn: Callable, item: Any) -> str:
    """Stable key of one task: ``fn``'s module + qualified name and the input (hashed unless short).

    The function's *code* is not part of the key: a changed function reuses the
    results its older version recorded. Use a new journal (or ``key=``) after
    changing what the function computes.
    """
    return _hash(key_prefix(fn), _encode(item))


def key_function(fn: Callable) -> Callable[[Any], str]:
    """``item -> task_key(fn, item)`` with the function's identity worked out once (the maps' default key)."""
    prefix = key_prefix(fn)
    tag = _tag(prefix)

    def key(item: Any) -> str:
        return _key(prefix, tag, _encode(item))

    key.__qualname__ = f"task_key[{function_id(fn)}]"
    return key


def keys_for(prefix: bytes, items: list) -> list[str | None]:
    """``task_key`` of each input (run on the engines); None where an input cannot be keyed."""
    out: list[str | None] = []
    tag = _tag(prefix)
    small = (tag + "=i%d;").__mod__  # the commonest input, an int, as _key would key it
    for item in items:
        if type(item) is int and -10**25 < item < 10**25:
            out.append(small(item))
            continue
        try:
            enc = _encode(item)
        except JournalError:
            out.append(None)  # the driver keys it, and says what is wrong
            continue
        out.append(_key(prefix, tag, enc))
    return out


def pack_keys(prefix: bytes, items: list) -> tuple[bytes, list[int]]:
    """The keys of ``items`` as the engines send them: (pickled keys, positions of inputs that cannot be keyed).

    Inputs that are all ints (the commonest case: ``range(n)``) are sent as they
    are, with ``prefix``: their keys are spelled out only when the journal is read
    (:func:`unpack_keys`), never on the map's way.
    """
    dumps, proto = pickle.dumps, pickle.HIGHEST_PROTOCOL
    if items and set(map(type, items)) == {int}:
        return dumps((prefix, items), protocol=proto), []
    keys = keys_for(prefix, items)
    bad = [pos for pos, key in enumerate(keys) if key is None]
    if bad:
        keys = [key for key in keys if key is not None]
    return dumps(keys, protocol=proto), bad


def unpack_keys(blob: bytes) -> list[str]:
    """The keys :func:`pack_keys` packed, spelled out."""
    keys = pickle.loads(blob)
    if type(keys) is tuple:  # (prefix, ints)
        prefix, ints = keys
        return keys_for(prefix, ints)  # type: ignore[return-value]  # an int can always be keyed
    return keys
