"""Private files and directories, and secrets kept out of logs: the one place ipmtc's file modes are decided.

A cluster's profile holds its keys (connection files), its state and its logs; a
journal holds pickled results that ipmtc unpickles on a rerun. On a machine shared
with other users, every such file is private from its first byte, whatever the
umask (``O_CREAT|O_EXCL|O_NOFOLLOW`` with mode 0600, or a 0600 temporary file
renamed into place, its mode checked after writing), and a directory or file that
someone else owns or may change is refused with one line saying what to do.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import SecurityError

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PRIVATE_UMASK = 0o077  # what processes ipmtc starts create is theirs alone


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter: made 0700, or checked if it was there.

    Refused (:class:`SecurityError`) when it is a symbolic link, belongs to someone
    else, or is open to group or others.
    """
    try:
        os.mkdir(path, PRIVATE_DIR)
        os.chmod(path, PRIVATE_DIR)  # (mkdir's mode passes through the umask)
        return path
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise SecurityError(f"{path} is a symbolic link; ipmtc keeps keys there and follows no links: remove it "
                            "or point IPYTHONDIR elsewhere")
    if not stat.S_ISDIR(st.st_mode):
        raise SecurityError(f"{path} is not a directory; remove it or pick another profile")
    check_owned(path, st, writable_by_others=True)  # (its mode is judged below, more strictly)
    if st.st_mode & 0o077:
        raise SecurityError(f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}); it will hold "
                            f"keys: run `chmod 700 {path}` or remove it")
    acl = _acl(path)
    if acl:
        raise SecurityError(f"{path} has an access control list ({acl}) that may open it to others whatever its "
                            f"mode: run `setfacl -b -k {path}` or remove it")
    return path


def _acl(path: Path) -> str | None:
    """The name of an access control list on ``path`` (POSIX or NFSv4), or None."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # no extended attributes here: no ACL either
        return None
    for name in ("system.posix_acl_access", "system.posix_acl_default", "system.nfs4_acl"):
        if name in names:
            return name
    return None


def check_owned(path: Path, st: os.stat_result | None = None, *, writable_by_others: bool = False) -> None:
    """Refuse ``path`` unless this user owns it (and, unless allowed, nobody else may write it)."""
    st = st or os.stat(path)
    if st.st_uid != os.geteuid():
        raise SecurityError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}); ipmtc uses only "
                            "files you own: remove it or pick another path")
    if not writable_by_others and st.st_mode & 0o022:
        raise SecurityError(f"{path} may be changed by other users (mode {stat.S_IMODE(st.st_mode):04o}); run "
                            f"`chmod go-w {path}` if you trust its contents, or remove it")


def write_private(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole, 0600 from its first byte: a new temporary file (``O_EXCL``, ``O_NOFOLLOW``)
    renamed over it, its mode checked (a file system that ignores modes is refused)."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")  # never one a crash left
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if mode & 0o077:
        os.unlink(tmp)
        raise SecurityError(f"{path}: the file system gave a new private file mode {mode:04o}; keys cannot be "
                            "kept private there: put IPYTHONDIR on a local or POSIX file system")
    os.replace(tmp, path)


def create_private(path: Path, flags: int = os.O_RDWR) -> int:
    """Open ``path`` with ``flags`` (``os.O_EXCL`` too, for a new file only), creating it 0600 if it is not
    there; never through a symbolic link. Returns the fd."""
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)


class _Redactor:
    """A log-record factory wrapper that replaces each secret in a record's text with ``<redacted>``."""

    def __init__(self, inner: Callable[..., logging.LogRecord], secrets: list[str]) -> None:
        self.inner, self.secrets = inner, secrets

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:
            return record
        if any(s in text for s in self.secrets):
            for s in self.secrets:
                text = text.replace(s, "<redacted>")
            record.msg, record.args = text, None
        return record


def redact_in_logs(secrets: Iterable[str | bytes]) -> None:
    """From now on, no log record of this process shows any of ``secrets`` (ipyparallel logs its whole
    configuration, session key included, at DEBUG)."""
    found = [s.decode() if isinstance(s, bytes) else s for s in secrets]
    found = [s for s in found if len(s) >= 8]
    if found:
        logging.setLogRecordFactory(_Redactor(logging.getLogRecordFactory(), found))
