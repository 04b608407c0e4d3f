"""Files of shell commands over the cluster: ``ipmtc run TASKS.txt`` and :func:`run_commands`.

One command per line (blank lines and ``#`` comments are skipped), run with
``dynamic_map`` semantics: each command runs on an engine under ``/bin/sh``,
with stdout and stderr in ``<outdir>/<n>.out`` and ``<outdir>/<n>.err`` (``n``
the 1-based line number), in the driver's working directory, with
``IPMTC_TASK_LINE=<n>`` in its environment. A non-zero exit status is a
failure (retried with ``retries``); ``walltime_s`` limits each command: at the
deadline its whole process group gets SIGTERM, then SIGKILL 5 s later.

With a journal (``ipmtc run`` keeps one next to the task file by default) a
rerun after a crash or Ctrl-C skips the lines that finished. A line's key is
its line number and its text: an edited line runs again, and so does every
line whose number changed because lines were inserted above it.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CommandFailed, CommandWalltime, JournalError, TaskFileError
from .outcomes import FAILED, OK, WALLTIME
from .packing import Packer, parse_line, parse_lines
from .stats import task_stats

KILL_GRACE_S = 5.0


# ---------------------------------------------------------------- task files


def read_task_file(path: str | os.PathLike) -> list[tuple[int, str]]:
    """``[(line number, command), ...]`` of a task file (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TaskFileError(f"task file {path} does not exist") from None
    except IsADirectoryError:
        raise TaskFileError(f"task file {path} is a directory; give a file with one command per line") from None
    except OSError as e:
        raise TaskFileError(f"cannot read task file {path}: {e.strerror}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        data = data[3:]
    out: list[tuple[int, str]] = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskFileError(f"task file {path}, line {n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                f"column {e.start + 1}); save the file as UTF-8") from None
        if "\0" in line:
            raise TaskFileError(f"task file {path}, line {n}: contains a NUL byte; is this a text file?")
        line = line.rstrip("\r").strip()
        if not line or line.startswith("#"):
            continue
        try:
            parse_line(n, line)  # a malformed [cores=..]/[ranks=..] prefix: said now, before anything starts
        except TaskFileError as e:
            raise TaskFileError(f"task file {path}, {e}") from None
        out.append((n, line))
    if not out:
        what = "is empty" if not data.strip() else "has only blank lines and # comments"
        raise TaskFileError(f"task file {path} {what}: nothing to run; put one shell command per line")
    return out


def _normalize(commands: Sequence[Any]) -> list[tuple[int, str]]:
    """Accept ``["cmd", ...]`` (numbered from 1) or ``[(line, "cmd"), ...]`` (from :func:`read_task_file`)."""
    if isinstance(commands, (str, bytes)):
        raise TaskFileError("commands must be a list of command lines, not one string "
                            "(use read_task_file(path) for a file)")
    out: list[tuple[int, str]] = []
    seen: set[int] = set()
    for pos, c in enumerate(commands, start=1):
        if isinstance(c, str):
            n, cmd = pos, c
        elif isinstance(c, (tuple, list)) and len(c) == 2 and isinstance(c[0], int) and isinstance(c[1], str):
            n, cmd = c
        else:
            raise TaskFileError(f"command #{pos} must be a string or a (line number, string) pair, got {c!r:.60}")
        if not cmd.strip():
            raise TaskFileError(f"command #{pos} (line {n}) is empty")
        if n in seen:
            raise TaskFileError(f"line number {n} appears twice; each command needs its own line number")
        seen.add(n)
        out.append((n, cmd))
    if not out:
        raise TaskFileError("no commands to run")
    return out


def command_key(task: tuple) -> str:
    """Journal key of one command: its line number and text (``"<line>:<hash of the text>"``)."""
    n, cmd = task[0], task[1]
    return f"{n}:{hashlib.blake2b(cmd.encode('utf-8', 'surrogatepass'), digest_size=12).hexdigest()}"


# ---------------------------------------------------------------- engine side


def _kill_group(p: subprocess.Popen, grace_s: float | None = None) -> None:
    """SIGTERM the command's process group, SIGKILL what is still running after ``grace_s``."""
    grace_s = KILL_GRACE_S if grace_s is None else grace_s
    _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while True:
        try:
            p.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
        if p.returncode is not None and not _group_members(p.pid):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _signal_group(p.pid, signal.SIGKILL)
    try:
        p.wait(timeout=5.0)
    except subprocess.TimeoutExpired:  # pragma: no cover (unkillable: D state)
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid`` (zombies may wait long for a reaper)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields after the command name: state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            out.append(int(d))
    return out


def _tail(path: str, n: int = 300) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            lines = f.read().decode(errors="replace").strip().splitlines()
        return lines[-1].strip()[:200] if lines else ""
    except OSError:
        return ""


def _popen(cmd: str, launch: dict[str, Any] | None, env: dict[str, str], **kw: Any) -> subprocess.Popen:
    """Start a line: under ``/bin/sh``; a K-core line pinned to its cores; an MPI line through its launcher."""
    if launch is None:
        return subprocess.Popen(cmd, shell=True, env=env, **kw)
    if launch["kind"] == "mpi":
        from .packing import launch_argv, launch_env

        return subprocess.Popen(launch_argv(cmd, launch), env=launch_env(env), **kw)
    from .resources import THREAD_VARS

    env.update({v: str(launch["threads"]) for v in THREAD_VARS})
    # sched_setaffinity(0) sets this thread's mask only, and a child inherits its forking thread's:
    # the engine's other threads keep theirs, and this one gets its own back right after the fork
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, launch["cpus"])
    try:
        return subprocess.Popen(cmd, shell=True, env=env, **kw)
    finally:
        os.sched_setaffinity(0, before)


def run_command(task: tuple) -> dict[str, Any]:
    """Run one command line (on an engine): ``(line, command, outdir, cwd, walltime_s[, launch])``.

    ``launch`` (a wide line's, from :mod:`ipmtc.packing`): the cores to pin it to, or how to start its MPI
    ranks. Returns ``{"line", "exit", "duration_s"}``; raises :class:`CommandFailed`
    for a non-zero exit status and :class:`CommandWalltime` past the walltime.
    """
    n, cmd, outdir, cwd, walltime_s = task[:5]
    launch = task[5] if len(task) > 5 else None
    os.makedirs(outdir, exist_ok=True)
    out_path, err_path = os.path.join(outdir, f"{n}.out"), os.path.join(outdir, f"{n}.err")
    if cwd is not None and not os.path.isdir(cwd):
        cwd = None  # another node without the driver's directory: run in the engine's
    env = dict(os.environ, IPMTC_TASK_LINE=str(n))
    for private in ("IPP_CONNECTION_INFO", "IPMTC_ENGINE_BIND"):  # the cluster's key stays with the engine
        env.pop(private, None)
    t0 = time.time()
    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        p = _popen(cmd, launch, env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, cwd=cwd,
                   start_new_session=True)  # its own group: killed as a whole at the walltime
        try:
            code = p.wait(timeout=walltime_s)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            raise CommandWalltime(f"line {n}: ran longer than walltime {walltime_s:g} s and was killed: "
                                  f"{cmd[:120]}") from None
        except BaseException:  # interrupted (abort, engine shutdown): do not leave the command behind
            _kill_group(p, grace_s=1.0)
            raise
    duration = time.time() - t0
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        tail = _tail(err_path)
        raise CommandFailed(f"line {n}: {how}: {cmd[:120]}" + (f" (stderr: {tail})" if tail else ""))
    out: dict[str, Any] = {"line": n, "exit": code, "duration_s": round(duration, 6)}
    if launch is not None and launch["kind"] == "cores":
        out["cpus"] = list(launch["cpus"])
    return out


# ---------------------------------------------------------------- driver side


def run_commands(commands: Sequence[Any], *, client=None, outdir: str | os.PathLike, retries: int = 0,
                 walltime_s: float | None = None, journal=None, retry_failed: bool = False,
                 progress: bool = True, cwd: str | os.PathLike | None = None, drain_margin_s: float = 30.0,
                 max_rss_mb: float | None = None):
    """Run shell command lines over the cluster's engines; returns the :class:`~ipmtc.MapResult`.

    ``commands``: command strings (numbered 1, 2, ...) or ``(line, command)``
    pairs as :func:`read_task_file` returns. Each result is ``{"line", "exit",
    "duration_s"}``; a failed command's slot holds its ``TaskFailure``.
    ``journal``: path or :class:`~ipmtc.journal.Journal`; lines recorded as
    done are skipped (``retry_failed=True`` reruns the failed ones too). If the
    journal cannot be written during the run, :class:`JournalError` is raised
    at the end with the finished run's result in its ``.result``. Inside a batch
    job no command is started that would not end ``drain_margin_s`` before the
    job does (judged by the median command time); those lines stay undone.
    """
    from .journal import Journal
    from .maps import dynamic_map

    lines = parse_lines(_normalize(commands))
    if walltime_s is not None and (isinstance(walltime_s, bool) or not isinstance(walltime_s, (int, float))
                                   or not walltime_s > 0):
        raise TaskFileError(f"walltime_s must be a number of seconds > 0, got {walltime_s!r}")
    outdir = Path(outdir).absolute()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TaskFileError(f"cannot create the output directory {outdir}: {e.strerror}") from None
    cwd = str(Path(cwd).absolute()) if cwd is not None else os.getcwd()
    items = [(line.n, line.cmd, str(outdir), cwd, line.walltime_s or walltime_s) for line in lines]
    wide = any(line.wide for line in lines)
    if wide and max_rss_mb is not None:
        raise TaskFileError("max_rss_mb / --max-rss-mb is not supported for files with [cores=]/[ranks=] lines; "
                            "leave it out or run those lines separately")
    jr, own = None, False
    if journal is not None:
        if isinstance(journal, Journal):
            jr = journal
        else:
            jr = open_journal(journal, outdir, retry_failed=retry_failed)
            own = True
    try:
        if wide:
            res = _run_packed(lines, items, client=client, retries=retries, journal=jr, drain_margin_s=drain_margin_s,
                              progress=progress)
        else:
            res = dynamic_map(run_command, items, client=client, retries=retries, progress=progress, journal=jr,
                              key=command_key, retry_failed=retry_failed, drain_margin_s=drain_margin_s,
                              max_rss_mb=max_rss_mb)
        if jr is not None:
            jr.flush()
    except KeyboardInterrupt:
        _abort_outstanding(client)
        raise
    finally:
        if own and jr is not None:
            jr.close()
    if jr is not None and jr.error is not None:
        err = JournalError(str(jr.error))
        err.result = res
        raise err
    return res


def _run_packed(lines, items, *, client, retries: int, journal, drain_margin_s: float, progress: bool):
    """A file with wide lines: :class:`ipmtc.packing.Packer` keeps the slots (the same keys as the plain path:
    line number and command, so adding a [cores=] line to a file does not rerun the others)."""
    from .allocation import job_end_time
    from .maps.api import _client_and_views, _crash_limit

    rc, engines = _client_and_views(client)
    packer = Packer(rc, lines, items, retries=retries, journal=journal, key_of=command_key, drain_at=job_end_time(),
                    drain_margin_s=drain_margin_s, run_fn=run_command, crash_limit=_crash_limit(None),
                    engines=engines, progress=progress)
    return packer.run()


def open_journal(path: str | os.PathLike, outdir: str | os.PathLike, *, retry_failed: bool = False):
    """The journal of a command run: bound to :func:`run_command` and to the output directory."""
    from .journal import Journal

    path = Path(path)
    rel = os.path.relpath(Path(outdir).absolute(), path.absolute().parent)
    return Journal.open(path, fn=run_command, retry_failed=retry_failed, context={"outdir": rel})


def _abort_outstanding(client) -> None:
    """Ctrl-C: drop the chunks still queued for engines (the running ones finish, unrecorded)."""
    try:
        if client is not None:
            import ipyparallel as ipp

            rc = client.client if isinstance(client, ipp.View) else client
            rc.abort(block=False)
    except Exception:
        pass


def summarize(res, tasks: Sequence[tuple[int, str]], journal=None, *, slowest: int = 5) -> dict[str, Any]:
    """Counts for the final table: done now, skipped (journal), failed (now / journal), undone, slowest."""
    hits = journal.hit_keys if journal is not None else set()
    st = task_stats(res.records)  # the same counts as MapResult.summary() and ipmtc report
    skipped = failed_before = walltime = 0
    rows, failed_rows = [], []
    for rec in res.records:
        n, cmd = tasks[rec.index]
        from_journal = rec.key is not None and rec.key in hits
        if rec.outcome == OK:
            skipped += from_journal
        elif rec.outcome in FAILED:
            failed_before += from_journal
            if (rec.error or "").startswith("CommandWalltime") or rec.outcome == WALLTIME:
                walltime += 1
            failed_rows.append((n, rec.attempts, rec.error or "", from_journal))
        if rec.duration_s is not None:
            rows.append((rec.duration_s, n, cmd, rec.outcome, from_journal))
    rows.sort(reverse=True)
    return {"commands": len(tasks), "done": st.ok - skipped, "skipped": skipped, "failed": st.failed,
            "failed_now": st.failed - failed_before, "failed_before": failed_before, "walltime": walltime,
            "undone": st.undone, "slowest": rows[:slowest], "failed_rows": sorted(failed_rows)}


def format_summary(s: dict[str, Any], *, outdir: str | os.PathLike, journal_path=None, elapsed_s: float = 0.0,
                   n_engines: int = 0, max_failed: int = 10) -> list[str]:
    """The table ``ipmtc run`` prints at the end."""
    lines = [f"ipmtc run: {s['commands']} commands, {n_engines} engines, {elapsed_s:.1f} s"]
    lines.append(f"  {'done':8s} {s['done']:7d}  ran now, exit code 0")
    jtxt = f"journal {journal_path}" if journal_path else "journal"
    lines.append(f"  {'skipped':8s} {s['skipped']:7d}  done in an earlier run ({jtxt})")
    detail = []
    if s["failed_now"]:
        detail.append(f"{s['failed_now']} this run")
    if s["failed_before"]:
        detail.append(f"{s['failed_before']} recorded earlier (--retry-failed reruns them)")
    if s["walltime"]:
        detail.append(f"{s['walltime']} past the walltime")
    lines.append(f"  {'failed':8s} {s['failed']:7d}  " + ("; ".join(detail) if detail else "-"))
    if s["undone"]:
        lines.append(f"  {'undone':8s} {s['undone']:7d}  not run (engines lost or allocation ending)")
    lines.append(f"  output: {outdir}/<line>.out|.err")
    if s["slowest"]:
        lines.append("slowest commands:")
        lines.append(f"  {'line':>6s} {'seconds':>9s}  {'outcome':8s} command")
        for dur, n, cmd, outcome, from_journal in s["slowest"]:
            note = " (earlier run)" if from_journal else ""
            lines.append(f"  {n:6d} {dur:9.2f}  {outcome:8s} {_short(cmd, 70)}{note}")
    if s["failed_rows"]:
        lines.append("failed commands:")
        for n, attempts, error, from_journal in s["failed_rows"][:max_failed]:
            note = " [earlier run]" if from_journal else ""
            lines.append(f"  line {n} ({attempts} attempt{'s' if attempts != 1 else ''}){note}: {_short(error, 140)}")
        more = len(s["failed_rows"]) - max_failed
        if more > 0:
            hint = f"; all of them: ipmtc journal show {journal_path} --failed" if journal_path else ""
            lines.append(f"  ... and {more} more{hint}")
    return lines


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


__all__ = ["CommandFailed", "CommandWalltime", "TaskFileError", "command_key", "read_task_file", "run_command",
           "run_commands"]
