"""The inbox: the append-only file beside a journal where the writer thread's group commits go.

``<journal>.inbox`` holds the commits not folded into the ``tasks`` table yet, one
*record* per commit: a 16-byte header (magic, payload length, CRC-32 of the
payload, tasks in it) and the payload, a pickle of ``(run, recorded, batches)``
(see :func:`.reader.inbox_rows`). A commit is one ``write()`` to a file opened
with ``O_APPEND``: no SQLite on the map's path, one system call per commit.

Durability. A record is in the kernel once ``write()`` returns, so it survives
the driver's death (SIGKILL included) at once; the writer thread ``fsync``\\s the
file at most every :data:`SYNC_INTERVAL_S` and when the journal is closed, so a
crash of the node itself loses at most that last second (those tasks run
again). A record cut short (the node crashed mid-write, or the disk filled) ends
the file's valid part: readers stop there, and the next driver cuts it off
before appending. A failed append is cut back at once, so a torn record is never
followed by good ones.

Folding (:meth:`.writer.Writer.merge`) copies every record into the ``tasks``
table in one SQLite transaction, then empties the file; a crash between the two
folds the same records again on the next open, which changes nothing (the
newest record of a key wins, and the file holds only records newer than the
table's).
"""
from __future__ import annotations

import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from .._private import create_private

MAGIC = b"IJI1"
HEADER = struct.Struct("<4sIII")  # magic, payload length, crc32(payload), tasks
SYNC_INTERVAL_S = 1.0  # the longest a committed record waits for fsync (a node crash loses at most this)

Record = tuple[int, float, int, list[tuple[bytes, bytes | None]]]  # (run, recorded, tasks, batches)


def inbox_path(journal: Path) -> Path:
    return Path(f"{journal}.inbox")


def _scan(fd: int) -> Iterator[tuple[int, int, bytes]]:
    """(end offset, tasks, payload) of each whole record of the open file ``fd``, oldest first, up to the
    first that is not whole. One record in memory at a time: an inbox of many large results is never
    read at once."""
    pos = 0
    while True:
        head = os.pread(fd, HEADER.size, pos)
        if len(head) < HEADER.size:
            return
        magic, length, crc, n = HEADER.unpack(head)
        if magic != MAGIC:
            return
        payload = os.pread(fd, length, pos + HEADER.size)
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        pos += HEADER.size + length
        yield pos, n, payload


def _whole_length(fd: int) -> int:
    """Bytes of ``fd``'s file that hold whole records (what follows is a record cut short)."""
    end = 0
    for record_end, _, _ in _scan(fd):
        end = record_end
    return end


def _scan_path(path: Path) -> Iterator[tuple[int, int, bytes]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        yield from _scan(fd)
    finally:
        os.close(fd)


def records(path: Path) -> Iterator[Record]:
    """Every whole record of the inbox at ``path``, oldest first (none if there is no file)."""
    for _, n, payload in _scan_path(path):
        run, recorded, batches = pickle.loads(payload)
        yield run, recorded, n, batches


def size(path: Path) -> tuple[int, int]:
    """(tasks, payload bytes) in the inbox at ``path`` (nothing unpickled)."""
    tasks = nbytes = 0
    for _, n, payload in _scan_path(path):
        tasks += n
        nbytes += len(payload)
    return tasks, nbytes


class Inbox:
    """The inbox opened for appending by the driver that holds the journal's lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # private from the first byte; a planted symlink is not followed
        self.fd = create_private(path, os.O_RDWR | os.O_APPEND)
        try:
            self.end = _whole_length(self.fd)
            if self.end < os.fstat(self.fd).st_size:  # a record cut short by a crash: cut it off
                os.ftruncate(self.fd, self.end)
        except BaseException:
            os.close(self.fd)
            raise
        self.dirty = False  # written since the last fsync

    def append(self, run: int, recorded: float, tasks: int, batches: list[tuple[bytes, bytes | None]]) -> None:
        """Append one record (one ``write()``); on a failure, cut the file back to where it was and raise."""
        payload = pickle.dumps((run, recorded, batches), protocol=pickle.HIGHEST_PROTOCOL)
        data = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload), tasks) + payload
        try:
            written = os.write(self.fd, data)
            while written < len(data):  # a regular file writes all of it unless the disk is full
                more = os.write(self.fd, memoryview(data)[written:])
                if more <= 0:
                    raise OSError(28, "No space left on device")
                written += more
        except OSError:
            try:
                os.ftruncate(self.fd, self.end)
            except OSError:
                pass
            raise
        self.end += len(data)
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False
            os.fsync(self.fd)

    def empty(self) -> None:
        """Drop every record (they were folded into the tasks table); durable before returning."""
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self.end = 0
        self.dirty = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

