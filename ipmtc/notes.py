"""The small files a running cluster keeps beside its state, and how they are read (standard library only).

- ``security/engines/<id>.json``: what each engine noted about itself once registered (node, pool, cores,
  GPUs, origin, its batch job's end, the ``ipmtc add`` that started it) -- written by :mod:`ipmtc.engine`;
- ``security/ipmtc-leaving.json``: the engines ``ipmtc remove`` asked to leave -- written by
  :mod:`ipmtc.elastic`, followed by running maps and wide-line runs (:class:`LeavingWatch`).

A leaf module: the maps, the packer, the engine entry point and the commands all read these files, and
none of them should import another for it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENGINE_NOTES = "engines"  # <profile>/security/engines/<id>.json
LEAVING_FILE = "ipmtc-leaving.json"  # <profile>/security/ipmtc-leaving.json


def notes_dir(profile_dir: str | os.PathLike) -> Path:
    return Path(profile_dir) / "security" / ENGINE_NOTES


def leaving_path(profile_dir: str | os.PathLike) -> Path:
    return Path(profile_dir) / "security" / LEAVING_FILE


def read_note(profile_dir: str | os.PathLike, engine_id: int | str) -> dict[str, Any] | None:
    """What engine ``engine_id`` noted about itself (None: not yet, or unreadable)."""
    try:
        note = json.loads((notes_dir(profile_dir) / f"{engine_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def read_notes(profile_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every engine's note: id -> note."""
    out: dict[str, dict[str, Any]] = {}
    for path in notes_dir(profile_dir).glob("*.json"):
        note = read_note(profile_dir, path.stem)
        if note is not None:
            out[path.stem] = note
    return out


def read_leaving(profile_dir: str | os.PathLike) -> set[int]:
    """Engine ids asked to leave (empty when none, or the file cannot be read)."""
    try:
        return {int(i) for i in json.loads(leaving_path(profile_dir).read_text()).get("ids", [])}
    except (OSError, ValueError, TypeError, AttributeError):
        return set()


class LeavingWatch:
    """Follows the leaving file of one profile: :meth:`changed` gives the ids asked to leave when the file was
    written since the last look (None otherwise). The file is replaced whole on each write, so its inode and
    nanosecond mtime tell every write apart (a whole-second mtime, as on some Lustre mounts, would not)."""

    def __init__(self, profile_dir: str | os.PathLike) -> None:
        self.profile_dir = profile_dir
        self._seen: tuple[int, int] | None = None

    def changed(self) -> set[int] | None:
        try:
            st = leaving_path(self.profile_dir).stat()
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self._seen:
            return None
        self._seen = stamp
        return read_leaving(self.profile_dir)
