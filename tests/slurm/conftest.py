"""A real Slurm for the tests: the project's local cluster (4 fake nodes n1..n4), one per session.

The session fixture :func:`slurm` runs ``harness/start-slurm.sh`` under a
private ``IPMTC_SLURM_BASE`` (a new temporary directory) and
``harness/stop-slurm.sh --purge`` at the end; the harness stops exactly the
daemons it started, by PID. It needs root and Debian's packages (installed by
the harness with apt when missing): without them the tests **fail** with the
reason, they are never skipped (CI runs as root).

Jobs are submitted by :class:`Jobs` (fixture ``jobs``): with ``--export=ALL``
and the test's environment (its private ``IPYTHONDIR``, the venv's ``bin`` first
on ``PATH``, ``SLURM_CONF``), from the repository root, with their output in
the test's tmp dir. Every job a test submitted is cancelled when the test ends.

``sbatch --wait`` polls slurmctld after 2 s, then sleeps x4 longer while the
sleep is below MinJobAge/2 (Slurm 22.05; at most 32 s): the cluster is started
with ``MinJobAge=16`` so that it polls every 8 s, not after 2, 10, 42, 74 s.
``Jobs.run`` submits with ``--parsable`` and polls ``scontrol show job`` every
0.25 s (no delay at all); ``Jobs.sbatch_wait`` runs the real ``sbatch --wait``
for the test of the documented usage.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).resolve().parent / "harness"
VENV_BIN = Path(sys.executable).parent
NODES = 4
CPUS = 4  # per node: -N 4 --ntasks-per-node=4 fills the cluster
GPUS = 4  # fake GPUs per node (gres with fake device files; jobs get them only with --gres/--gpus*)
START_TIMEOUT_S = 600  # includes apt-get install on a fresh machine
MIN_JOB_AGE = 16  # sbatch --wait then polls every 8 s instead of after 2, 10, 42, 74 s (see the harness README)
PURGED = "PURGED"  # a finished job slurmctld no longer knows (MinJobAge passed)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", PURGED}

# figures for the closing note, printed in the terminal summary
TIMINGS: dict[str, str] = {}


def record(name: str, value: str) -> None:
    TIMINGS[name] = value
    print(f"[ipmtc-slurm timing] {name}: {value}")


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("ipmtc Slurm timings")
        for k, v in TIMINGS.items():
            terminalreporter.write_line(f"{k}: {v}")


@dataclass
class SlurmCluster:
    base: Path
    conf: Path
    install_s: float
    start_s: float

    def env(self, environ: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """The environment for Slurm commands and jobs: ``environ`` (default: os.environ) + SLURM_CONF + venv."""
        env = dict(os.environ if environ is None else environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env.update(extra)
        return env

    def cmd(self, *argv: str, timeout_s: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env(), capture_output=True, text=True, timeout=timeout_s,
                              check=check, stdin=subprocess.DEVNULL)


def _harness(script: str, env: dict[str, str], *args: str, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(HARNESS / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """Start the local Slurm (n1..n4) for the session; stop it (by PID) and purge its dir at the end."""
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start a local Slurm cluster and need root (CI runs them as root); "
                    "run `sudo .venv/bin/python -m pytest tests/slurm` or deselect tests/slurm", pytrace=False)
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(c, path=os.environ.get(
        "PATH", "") + ":/usr/sbin:/sbin")]
    if missing and not shutil.which("apt-get"):
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} missing) and apt-get is not available to "
                    "install it; the Slurm tests need Debian's munge slurmctld slurmd slurm-client",
                    pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="ipmtc-slurm-", dir="/tmp"))  # short: slurmd puts sockets under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "IPMTC_"))}
    env.update(IPMTC_SLURM_BASE=str(base), IPMTC_SLURM_NODES=str(NODES), IPMTC_SLURM_CPUS=str(CPUS),
               IPMTC_SLURM_GPUS=str(GPUS), IPMTC_SLURM_MIN_JOB_AGE=str(MIN_JOB_AGE))
    t0 = time.monotonic()
    try:
        cp = _harness("start-slurm.sh", env, timeout_s=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _harness("stop-slurm.sh", env, "--purge", timeout_s=120)
        pytest.fail(f"tests/slurm/harness/start-slurm.sh did not finish within {START_TIMEOUT_S} s", pytrace=False)
    if cp.returncode != 0:
        log = cp.stderr.strip().splitlines()[-15:]
        _harness("stop-slurm.sh", env, "--purge", timeout_s=120)
        pytest.fail("could not start the local Slurm cluster (tests/slurm/harness/start-slurm.sh exited "
                    f"{cp.returncode}):\n" + "\n".join(log), pytrace=False)
    wall = time.monotonic() - t0
    m = re.search(r"install ([\d.]+)s start ([\d.]+)s", cp.stdout)
    install_s, start_s = (float(m.group(1)), float(m.group(2))) if m else (float("nan"), wall)
    record("local Slurm install", f"{install_s:.2f} s (0 when already installed)")
    record("local Slurm start (4 nodes idle + first scheduling pass)", f"{start_s:.2f} s; script wall {wall:.2f} s")
    env_sh = (base / "env.sh").read_text()  # what `source $BASE/env.sh` exports
    m = re.search(r"^export SLURM_CONF=(\S+)$", env_sh, re.M)
    if not m:
        _harness("stop-slurm.sh", env, "--purge", timeout_s=120)
        pytest.fail(f"{base}/env.sh exports no SLURM_CONF:\n{env_sh}", pytrace=False)
    cluster = SlurmCluster(base=base, conf=Path(m.group(1)), install_s=install_s, start_s=start_s)
    try:
        yield cluster
    finally:
        t1 = time.monotonic()
        cp = _harness("stop-slurm.sh", env, "--purge", timeout_s=180)
        record("local Slurm stop", f"{time.monotonic() - t1:.2f} s")
        if cp.returncode != 0:
            pytest.fail(f"stop-slurm.sh exited {cp.returncode}: {cp.stderr.strip()[-2000:]}", pytrace=False)


# ---------------------------------------------------------------- jobs


@dataclass
class Job:
    job_id: str
    out: Path
    submitted: float  # epoch seconds, just before sbatch
    state: str = ""
    exit_code: int | None = None
    signal: int | None = None
    info: dict[str, str] = field(default_factory=dict)

    @property
    def output(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _job_fields(text: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", text))


class Jobs:
    """Submit jobs for one test; cancel whatever is left when it ends."""

    def __init__(self, slurm: SlurmCluster, tmp: Path):
        self.slurm, self.tmp = slurm, tmp
        self.submitted: list[Job] = []
        self._n = 0

    def _argv(self, sbatch_args, script, script_args, out: Path) -> list[str]:
        return ["sbatch", "--export=ALL", f"--chdir={REPO}", f"--output={out}", *sbatch_args,
                *([str(script)] if script else []), *script_args]

    def submit(self, sbatch_args=(), script: str | os.PathLike | None = None, script_args=(),
               env: dict[str, str] | None = None, name: str = "job") -> Job:
        self._n += 1
        out = self.tmp / f"{name}-{self._n}.out"
        t0 = time.time()
        cp = subprocess.run(["sbatch", "--parsable", *self._argv(sbatch_args, script, script_args, out)[1:]],
                            env=env or self.slurm.env(), cwd=REPO, capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, f"sbatch failed: {cp.stderr}"
        job = Job(job_id=cp.stdout.strip().split(";")[0], out=out, submitted=t0)
        self.submitted.append(job)
        return job

    def poll(self, job: Job) -> str:
        if job.state == PURGED:
            return job.state
        cp = self.slurm.cmd("scontrol", "-o", "show", "job", job.job_id, check=False)
        if cp.returncode != 0 and "Invalid job id" in cp.stderr:
            job.state = PURGED  # finished more than MinJobAge ago: keep what the last poll saw
            return job.state
        job.info = _job_fields(cp.stdout)
        job.state = job.info.get("JobState", "")
        if job.state in FINAL_STATES:
            code, _, sig = job.info.get("ExitCode", ":").partition(":")
            job.exit_code = int(code) if code.isdigit() else None
            job.signal = int(sig) if sig.isdigit() else None
        return job.state

    def wait(self, job: Job, timeout_s: float = 180) -> Job:
        deadline = time.monotonic() + timeout_s
        while self.poll(job) not in FINAL_STATES:
            if time.monotonic() > deadline:
                self.cancel(job)
                pytest.fail(f"job {job.job_id} still {job.state} after {timeout_s} s; output:\n{job.output}")
            time.sleep(0.25)
        return job

    def run(self, *args, timeout_s: float = 180, **kwargs) -> Job:
        return self.wait(self.submit(*args, **kwargs), timeout_s=timeout_s)

    def sbatch_wait(self, sbatch_args=(), script=None, script_args=(), env=None, name: str = "job",
                    timeout_s: float = 240) -> tuple[Job, int]:
        """The documented way: ``sbatch --wait`` (returns the job's exit status)."""
        self._n += 1
        out = self.tmp / f"{name}-{self._n}.out"
        t0 = time.time()
        argv = ["sbatch", "--wait", "--parsable", *self._argv(sbatch_args, script, script_args, out)[1:]]
        with subprocess.Popen(argv, env=env or self.slurm.env(), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) as p:
            first = p.stdout.readline()  # the job id, printed before it waits
            job = Job(job_id=first.strip().split(";")[0], out=out, submitted=t0)
            if job.job_id:
                self.submitted.append(job)  # cancelled at the end of the test if still there
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                pytest.fail(f"sbatch --wait did not return within {timeout_s} s; output:\n{job.output}")
            err = p.stderr.read()
        assert job.job_id, f"sbatch failed: {err}"
        self.wait(job, timeout_s=30)
        return job, p.returncode

    def wait_for_output(self, job: Job, pattern: str, timeout_s: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern, re.M)
        while True:
            m = rx.search(job.output)
            if m:
                return m
            if self.poll(job) in FINAL_STATES or time.monotonic() > deadline:
                pytest.fail(f"job {job.job_id} ({job.state}) never printed {pattern!r}; output:\n{job.output}")
            time.sleep(0.1)

    def cancel(self, job: Job) -> None:
        self.slurm.cmd("scancel", job.job_id, check=False)

    def cleanup(self) -> None:
        for job in self.submitted:
            if self.poll(job) not in FINAL_STATES:
                self.cancel(job)
        deadline = time.monotonic() + 30
        for job in self.submitted:
            while self.poll(job) not in FINAL_STATES and time.monotonic() < deadline:
                time.sleep(0.2)


@pytest.fixture
def jobs(slurm, tmp_path):
    j = Jobs(slurm, tmp_path)
    try:
        yield j
    finally:
        j.cleanup()
