"""``ipmtc run TASKS.txt`` and ``run_commands``: real programs on a real cluster, interrupted and resumed.

One 4-engine local cluster for the module (``shared_cluster``: private
IPYTHONDIR, stopped and checked for leftovers at the end). ``ipmtc run`` runs
as a real CLI subprocess; the first three runs are interrupted midway (SIGINT,
SIGTERM, SIGKILL), the fourth finishes and must skip what was done.

Nothing here depends on how fast the commands run (500 of them take about
2 s, less than a few journal commits): an interrupted run is given the task
file up to some line, its last 60 commands behind a gate (they wait for a file
the test creates once that run has exited), and it is interrupted once the
journal *records* enough new commands. It cannot end before that, it is
stopped with the engines in gated commands, and those are never recorded.
The fourth run gets the whole file.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ipmtc.commands import open_journal, run_commands
from ipmtc.errors import JournalError
from ipmtc.journal import Journal

from .._wait import wait_for, wait_until_gone
from ..conftest import processes_with_env

N_LINES = 500
WALLTIME_S = 2
GATED = 60  # commands behind a gate in each interrupted run (the engines all end up waiting there)


def _ipmtc(*args: str) -> list[str]:
    return [sys.executable, "-m", "ipmtc", *args]


def _env(cluster) -> dict[str, str]:
    return {**os.environ, "IPYTHONDIR": str(Path(cluster.profile_dir).parent)}


def _task_lines(d: Path) -> tuple[list[str], list[int], dict[int, str], set[int], int]:
    """500 commands (with comments and blank lines between): the task file's lines, where each command's
    line is (``ends[i]``: how many lines up to command ``i``), line number -> what its stdout must be,
    the failing lines and the line that hangs."""
    data = d / "data"
    data.mkdir()
    blobs = []
    for k in range(10):
        f = data / f"{k}.txt"
        f.write_bytes(f"sample {k}\n".encode() * (100 * (k + 1)))
        blobs.append(f)
    lines = ["# ipmtc run test: real programs", ""]
    ends: list[int] = []
    expect: dict[int, str] = {}
    failing: set[int] = set()
    fail_cmds = ["false", "sh -c 'exit 1'", f"{sys.executable} -c 'import sys; sys.exit(1)'",
                 "grep -q no-such-text data/0.txt", "ls data/no-such-file"]
    hang = None
    for i in range(N_LINES):
        f = blobs[i % 10]
        rel = f.relative_to(d)
        if i % 100 == 37:
            cmd = fail_cmds[i // 100]
        elif i == 480:
            cmd = "sleep 600"  # past the walltime: killed
        elif i % 5 == 0:
            cmd = f"sha256sum {rel}"
            out = f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {rel}\n"
        elif i % 5 == 1:
            cmd = f"gzip -c {rel} | gzip -dc | wc -c"
            out = f"{len(gzip.decompress(gzip.compress(f.read_bytes())))}\n"
        elif i % 5 == 2 and i % 25 == 2:  # python starts slowly: a few of them
            cmd = f"{sys.executable} -c 'print({i} * {i})'"
            out = f"{i * i}\n"
        else:
            cmd = f"echo line {i}; echo to-stderr >&2"
            out = f"line {i}\n"
        if i % 50 == 10:
            lines.append("")
            lines.append(f"   # comment before command {i}")
        lines.append(cmd)
        n = len(lines)
        ends.append(n)
        if cmd == "sleep 600":
            hang = n
        elif i % 100 == 37:
            failing.add(n)
        else:
            expect[n] = out
    return lines, ends, expect, failing, hang


def _gated(cmd: str, gate: Path) -> str:
    """``cmd`` run only once ``gate`` exists: it cannot finish, nor be recorded, before the test opens the gate."""
    return f"while [ ! -e '{gate}' ]; do sleep 0.02; done; {cmd}"


def _write_stage(path: Path, lines: list[str], ends: list[int], plain: int, gated: int, gate: Path) -> None:
    """The task file with its first ``plain`` commands as they are and the next ``gated`` ones behind ``gate``.

    The gated commands keep their line numbers but not their text (their keys differ from the real
    lines'): once every engine waits in one of them, the run holds still until it is interrupted.
    """
    body = lines[:ends[plain - 1]]
    for i in range(plain, plain + gated):
        body += lines[ends[i - 1]:ends[i] - 1] + [_gated(lines[ends[i] - 1], gate)]
    path.write_text("\n".join(body) + "\n")


def _gate_processes(cluster, gate: Path) -> list[int]:
    """Engine-side processes of gated commands (waiting, or not yet seen the gate open)."""
    out = []
    for pid in processes_with_env(f"IPYTHONDIR={Path(cluster.profile_dir).parent}"):
        try:
            if str(gate).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


def _table(stdout: str) -> dict[str, int]:
    got = {k: int(v) for k, v in re.findall(r"^  (done|skipped|failed|undone)\s+(\d+)", stdout, re.M)}
    assert {"done", "skipped", "failed"} <= set(got), stdout
    return got


def _journal_counts(db: Path) -> dict[str, int]:
    try:
        r = Journal.open(db, readonly=True)
    except JournalError as e:  # not there yet, or being created this very moment
        if "does not exist" in str(e) or "holds nothing yet" in str(e):
            return {}
        raise
    try:
        return r.counts()
    finally:
        r.close()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_midway(argv, env, cwd, db: Path, sig: int, at_least: int) -> subprocess.CompletedProcess:
    """Start ``ipmtc run``, send ``sig`` once the journal records ``at_least`` more done (ok) commands.

    The task file must hold gated commands (:func:`_write_stage`): the run is still running when the signal
    comes, whatever the speed of the commands. Every record seen before the signal was committed, so the
    journal holds at least ``at_least`` more ok records afterwards.
    """
    before = _journal_counts(db).get("ok", 0)
    # Ctrl-C as at a terminal: a test runner started in the background of a non-interactive shell
    # hands its children SIGINT ignored, and Python keeps it ignored (as ipmtc run then rightly does)
    p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_default_sigint)
    try:
        seen: dict[str, int] = {}

        def recorded_or_ended() -> bool:
            seen.update(_journal_counts(db))
            return p.poll() is not None or seen.get("ok", 0) >= before + at_least

        wait_for(recorded_or_ended, 120, lambda: f"{at_least} more ok records than {before} (journal: {seen})")
        assert p.poll() is None, f"ipmtc run ended before the interrupt:\n{p.stdout.read()}\n{p.stderr.read()}"
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _no_command_left(cluster) -> None:
    """No `sleep 600` (or any other command) survives on the engines' side."""
    left = []
    for pid in processes_with_env(f"IPYTHONDIR={Path(cluster.profile_dir).parent}"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "sleep" in cmd:
            left.append((pid, cmd))
    assert not left, f"commands left running: {left}"


def test_run_500_commands_interrupted_three_times_then_resumed(shared_cluster, tmp_path):
    lines, ends, expect, failing, hang = _task_lines(tmp_path)
    path = tmp_path / "tasks.txt"
    db, outdir = Path(f"{path}.journal.db"), Path(f"{path}.out")
    env = _env(shared_cluster)
    argv = _ipmtc("run", path.name, "--profile", shared_cluster.profile, "--retries", "1", "--no-progress")

    def interrupted(stage: int, plain: int, sig: int, at_least: int) -> subprocess.CompletedProcess:
        """Run the first ``plain`` commands and GATED more, interrupted once ``at_least`` more are recorded."""
        gate = tmp_path / f"gate-{stage}"
        _write_stage(path, lines, ends, plain, GATED, gate)
        res = _interrupt_midway(argv, env, tmp_path, db, sig, at_least)
        gate.touch()  # the run has exited: what it left running on the engines ends now, unrecorded
        wait_until_gone(lambda: _gate_processes(shared_cluster, gate), 60, f"the gated commands of run {stage}")
        return res

    def ok_lines(plain: int) -> int:
        return sum(1 for n in expect if n <= ends[plain - 1])

    first = interrupted(1, 100, signal.SIGINT, at_least=40)
    assert first.returncode == 130, (first.stdout, first.stderr)
    assert "ipmtc run: interrupted;" in first.stderr and "run the same command again" in first.stderr
    after_first = _journal_counts(db)
    assert 40 <= after_first.get("ok", 0) <= ok_lines(100), after_first

    term = interrupted(2, 220, signal.SIGTERM, at_least=30)  # scancel, batch warning
    assert term.returncode == 143 and "ipmtc run: terminated (SIGTERM);" in term.stderr, (term.stdout, term.stderr)
    after_term = _journal_counts(db)
    assert after_first["ok"] + 30 <= after_term.get("ok", 0) <= ok_lines(220), after_term

    second = interrupted(3, 340, signal.SIGKILL, at_least=30)
    assert second.returncode == -signal.SIGKILL
    after_second = _journal_counts(db)
    assert after_term["ok"] + 30 <= after_second.get("ok", 0) <= ok_lines(340), after_second
    assert sum(after_second.values()) <= 340  # no gated command was recorded

    path.write_text("\n".join(lines) + "\n")  # the whole file, and a walltime for the line that hangs
    argv += ["--walltime-s", str(WALLTIME_S)]  # (none before: it would end the gated commands)
    third = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert third.returncode == 1, (third.stdout, third.stderr)  # some commands failed
    table = _table(third.stdout)
    n_ok = N_LINES - len(failing) - 1
    skipped_expected = after_second["ok"]
    failed_before = sum(v for k, v in after_second.items() if k != "ok")
    assert table["skipped"] == skipped_expected, third.stdout  # done lines were not run again
    assert table["done"] == n_ok - skipped_expected
    assert table["failed"] == len(failing) + 1 and "1 past the walltime" in third.stdout
    if failed_before:
        assert f"{failed_before} recorded earlier" in third.stdout
    assert "slowest commands:" in third.stdout and "sleep 600" in third.stdout
    assert re.search(r"line \d+ \(2 attempts\)(?: \[earlier run\])?: CommandWalltime: line \d+: ran longer "
                     rf"than walltime {WALLTIME_S} s", third.stdout), third.stdout
    assert _journal_counts(db) == {"ok": n_ok, "raised": len(failing) + 1}

    for n, want in expect.items():  # every done line's output, from whichever run did it
        assert (outdir / f"{n}.out").read_text() == want, n
    assert (outdir / f"{min(failing)}.err").exists()
    _no_command_left(shared_cluster)

    r = Journal.open(db, readonly=True)  # no line recorded twice, and each one with its own line
    try:
        rows = list(r.rows(values=True))
    finally:
        r.close()
    assert len(rows) == len({x["key"] for x in rows}) == N_LINES
    assert {x["value"]["line"] for x in rows if x["outcome"] == "ok"} == set(expect)
    errors = {x["error"] for x in rows if x["outcome"] != "ok"}
    assert any(re.match(r"CommandFailed: line \d+: exit code 1: false", e) for e in errors), errors
    assert any(e.startswith(f"CommandWalltime: line {hang}:") for e in errors), errors

    show = subprocess.run(_ipmtc("journal", "show", str(db), "--failed"), env=env, capture_output=True, text=True,
                          timeout=60)
    assert show.returncode == 0 and f"failed tasks ({len(failing) + 1}):" in show.stdout, show.stdout

    again = subprocess.run([*argv, "--retry-failed"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=180)
    assert again.returncode == 1 and _table(again.stdout)["skipped"] == n_ok
    assert "ran now" in again.stdout and _table(again.stdout)["failed"] == len(failing) + 1


def test_run_commands_from_python(rc, tmp_path):
    out = tmp_path / "out"
    cmds = ["echo a", "exit 4", f"{sys.executable} -c 'import os; print(os.environ[\"IPMTC_TASK_LINE\"])'"]
    res = run_commands(cmds, client=rc, outdir=out, progress=False, journal=tmp_path / "j.db", cwd=tmp_path)
    assert [v["line"] for v in res if isinstance(v, dict)] == [1, 3]
    assert res[0]["exit"] == 0 and (out / "1.out").read_text() == "a\n" and (out / "3.out").read_text() == "3\n"
    assert len(res.failed) == 1 and res.failed[0].ename == "CommandFailed" and "exit code 4" in res.failed[0].evalue
    again = run_commands(cmds, client=rc, outdir=out, progress=False, journal=tmp_path / "j.db")
    assert again.journal_hits == 3 and again[2] == res[2]
    with pytest.raises(JournalError, match="written with outdir 'out', this run has outdir 'elsewhere'"):
        run_commands(cmds, client=rc, outdir=tmp_path / "elsewhere", progress=False, journal=tmp_path / "j.db")


# --------------------------------------------------------------------------- bad input (no cluster needed)


def test_bad_input_one_line_errors(tmp_path):
    """Each case fails before any cluster is contacted: exit 1, one stderr line, no traceback."""
    cases: dict[str, tuple[list[str], str]] = {}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"echo 1\n# fine\necho caf\xe9\n")
    cases["encoding"] = (["run", str(bad)], rf"task file {bad}, line 3: not valid UTF-8 \(byte 0xe9 at column 9\)")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    cases["empty"] = (["run", str(empty)], "has only blank lines and # comments: nothing to run")
    cases["missing"] = (["run", str(tmp_path / "nope.txt")], "does not exist")

    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo hi\n")
    other = tmp_path / "other.db"  # a journal of another map
    Journal.open(other, fn=shutil.which).close()
    cases["function"] = (["run", str(tasks), "--journal", str(other)],
                         "belongs to a map of shutil:which, not of ipmtc.commands:run_command")
    old = tmp_path / "old.db"
    open_journal(old, f"{tasks}.out").close()
    con = sqlite3.connect(old)
    con.execute("UPDATE meta SET value = '0' WHERE name = 'schema_version'")
    con.commit()
    con.close()
    cases["version"] = (["run", str(tasks), "--journal", str(old)], "written in journal format version 0")
    busy = tmp_path / "busy.db"
    holder = open_journal(busy, f"{tasks}.out")
    cases["second driver"] = (["run", str(tasks), "--journal", str(busy)],
                              f"journal {busy} is in use by another driver \\(pid {os.getpid()} on host")
    ro = tmp_path / "ro"
    ro.mkdir()
    cases["read-only dir"] = (["run", str(tasks), "--journal", str(ro / "j.db")],
                              "cannot create the journal lock file .* the journal's directory must be writable")
    cases["show version"] = (["journal", "show", str(old)], "written in journal format version 0")

    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")}  # no cluster there: must not get that far
    os.chmod(ro, 0o555)
    procs = {}
    try:
        for name, (args, _) in cases.items():
            argv = _ipmtc(*args)
            if name == "read-only dir" and os.geteuid() == 0:  # root writes anywhere unless it drops that right
                if not shutil.which("setpriv"):
                    continue
                argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *argv]
            procs[name] = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results = {name: (p.wait(timeout=60), *p.communicate()) for name, p in procs.items()}
    finally:
        os.chmod(ro, 0o755)
        holder.close()
    for name, (code, out, err) in results.items():
        pattern = cases[name][1]
        assert code == 1, (name, code, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ipmtc: error: "), (name, err)
        assert re.search(pattern, lines[0]), (name, lines[0])
