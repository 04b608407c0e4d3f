"""Secure by default on a shared machine: negative tests first, with a second Unix user and packet captures.

Real components only: a real controller and engines, a second Unix user made
with ``useradd`` (CI runs as root; removed at the end), a raw ``AF_PACKET``
capture of the loopback interface, real files under ``umask 000``. The cluster's
IPYTHONDIR sits under world-traversable directories, so that ipmtc's own file
modes are all that keeps the other user out.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import psutil
import pytest
import zmq

import ipmtc
from ipmtc import cluster
from ipmtc.errors import JournalError, SecurityError
from ipmtc.journal import Journal

from ..conftest import processes_with_env, stop_and_check, wait_all_dead

MARKER = "ipmtc-secret-marker-7f3a"
ETH_P_ALL = 0x0003


def _mark(x):
    import os

    print(f"{MARKER} printed {x}", flush=True)
    os.write(1, f"{MARKER} fd1 {x}\n".encode())
    return f"{MARKER} result {x}"


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def open_ipython_dir(monkeypatch):
    """An IPYTHONDIR whose parents anyone may traverse: only ipmtc's own modes protect what is in it."""
    root = Path(f"/tmp/ipmtc-sec-{uuid.uuid4().hex[:10]}")
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    d = root / "ipython"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    monkeypatch.setenv("IPYTHONDIR", str(d))
    yield d
    left = wait_all_dead(processes_with_env(f"IPYTHONDIR={d}"), timeout_s=10)
    shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes left running by the test: {left}"


@pytest.fixture
def secure_cluster(open_ipython_dir):
    started: list[cluster.ClusterInfo] = []

    def _start(n: int = 2, **flags):
        info = cluster.start(engines=n, profile=f"s-{uuid.uuid4().hex[:6]}", flags={"launcher": "local", **flags})
        started.append(info)
        return info

    yield _start
    for info in started:
        stop_and_check(info)


@pytest.fixture
def other_user(tmp_path_factory):
    """A second Unix user (made with useradd, removed after), and a Python with pyzmq it may run."""
    assert os.geteuid() == 0, "the second-user tests run as root (CI does): they create a user with useradd"
    name = f"ipmtcp{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    try:
        pw = pwd.getpwnam(name)
        # this Python may live where the other user cannot go (/root): a system Python of the same
        # version, with a world-readable copy of pyzmq, runs the probe
        python = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}",
                              path="/usr/bin:/usr/local/bin:/bin")
        assert python, f"no system python{sys.version_info.major}.{sys.version_info.minor} the second user can run"
        libs = Path(f"/tmp/ipmtc-probe-{uuid.uuid4().hex[:8]}")
        libs.mkdir(mode=0o755)
        os.chmod(libs, 0o755)
        zdir = Path(zmq.__file__).parent
        shutil.copytree(zdir, libs / "zmq")
        if (zdir.parent / "pyzmq.libs").is_dir():
            shutil.copytree(zdir.parent / "pyzmq.libs", libs / "pyzmq.libs")
        for p in libs.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        yield pw, python, libs
        shutil.rmtree(libs, ignore_errors=True)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


PROBE = r'''
import hashlib, hmac, json, sys, time, uuid
import zmq
job = json.loads(sys.argv[1])
out = {"read": {}, "replies": {}}
for path in job["files"]:
    try:
        with open(path, "rb") as f:
            f.read(1)
        out["read"][path] = "READ"
    except OSError as e:
        out["read"][path] = type(e).__name__
ctx = zmq.Context()
socks = []  # every probe at once: (endpoint, socket)
for name, url in job["endpoints"]:
    for mode in ("nokey", "stolen", "sub"):
        s = ctx.socket(zmq.SUB if mode == "sub" else zmq.DEALER)
        s.linger = 0
        if mode == "sub":
            s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(url)
        if mode == "stolen":
            # a properly signed hub query, as a client with the stolen HMAC key (but no curve keys) sends it
            hdr = json.dumps({"msg_id": uuid.uuid4().hex, "msg_type": "connection_request",
                              "session": uuid.uuid4().hex, "username": "x", "date": "2026-01-01T00:00:00Z",
                              "version": "5.3"}).encode()
            parts = [hdr, b"{}", b"{}", b"{}"]
            h = hmac.new(job["key"].encode(), digestmod=hashlib.sha256)
            for part in parts:
                h.update(part)
            s.send_multipart([b"<IDS|MSG>", h.hexdigest().encode(), *parts])
        elif mode == "nokey":
            s.send_multipart([b"hello?"])
        socks.append((name, s))
print("READY", flush=True)
sys.stdin.readline()  # the test makes the cluster print and answer now
deadline = time.monotonic() + 2.0
counts = {name: 0 for name, _ in job["endpoints"]}
poller = zmq.Poller()
for _, s in socks:
    poller.register(s, zmq.POLLIN)
by_sock = {s: name for name, s in socks}
while time.monotonic() < deadline:
    for s, _ in poller.poll(100):
        while s.poll(0):
            counts[by_sock[s]] += len(s.recv_multipart())
for _, s in socks:
    s.close(0)
out["replies"] = counts
print(json.dumps(out), flush=True)
'''


def _listening(pids) -> list[tuple[str, str]]:
    """(owner, tcp://addr:port) of every socket the processes listen on."""
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for c in proc.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((f"{proc.name()}:{pid}", f"tcp://{c.laddr.ip}:{c.laddr.port}"))
        except psutil.Error:
            continue
    return out


def _private_files(pdir: Path) -> list[Path]:
    return [p for p in pdir.rglob("*")]


# ---------------------------------------------------------------- negative tests


@pytest.mark.parametrize("security", ["curve", "hmac"])
def test_another_user_reads_nothing_and_gets_no_reply(secure_cluster, other_user, security):
    """Another user can read no file of the profile and gets not one message from any port of the cluster
    (controller, engines, nannies, the driver's channel) -- without a key, or with the HMAC key stolen but
    no curve keys. With ``security: hmac`` the same probe does get replies: the probe works."""
    pw, python, libs = other_user
    info = secure_cluster(2, security=security)
    rc = ipmtc.connect(info.profile)
    try:
        res = ipmtc.dynamic_map(_mark, range(4), client=rc, progress=False)  # the channel is open now
        assert not res.failed
        pdir = Path(info.profile_dir)
        key = json.loads((pdir / "security" / "ipcontroller-client.json").read_text())["key"]
        files = [str(p) for p in _private_files(pdir) if p.is_file()]
        ends = list(dict((u, (o, u)) for o, u in _listening([*info.pids, os.getpid()])).values())
        assert any(owner.startswith("python") for owner, _ in ends)
        job = {"files": files, "endpoints": [[f"{o} {u}", u] for o, u in ends], "key": key}
        p = subprocess.Popen([python, "-c", PROBE, json.dumps(job)], user=pw.pw_uid, group=pw.pw_gid,
                             env={"PYTHONPATH": str(libs), "PATH": "/usr/bin:/bin"}, cwd="/",
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "READY", p.stderr.read()
            ipmtc.dynamic_map(_mark, range(8), client=rc, progress=False)  # output and results flow now
            rc[:].apply_async(_mark, 99).get(timeout=60)  # (bounded: a hang here once, seen with hmac)
            out, err = p.communicate("go\n", timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        rc.close()
    assert files and all(v == "PermissionError" for v in result["read"].values()), result["read"]
    replies = result["replies"]
    if security == "curve":
        assert sum(replies.values()) == 0, replies
    else:  # signed only: the hub answers the stolen key, and iopub hands anyone the output
        assert sum(replies.values()) > 0, replies


def test_a_client_with_a_wrong_key_is_rejected_and_the_cluster_keeps_serving(secure_cluster, tmp_path):
    info = secure_cluster(2, security="hmac")
    pdir = Path(info.profile_dir)
    conn = json.loads((pdir / "security" / "ipcontroller-client.json").read_text())
    conn["key"] = "0" * 64
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(conn))
    import ipyparallel as ipp

    with pytest.raises(TimeoutError, match="timed out"):
        ipp.Client(str(forged), timeout=3).close()
    rc = ipmtc.connect(info.profile)
    try:
        assert sorted(rc[:].apply_sync(os.getpid)) == sorted(rc[:].apply_sync(os.getpid))
        assert list(ipmtc.dynamic_map(abs, [-1, -2], client=rc, progress=False)) == [1, 2]
    finally:
        rc.close()


# ---------------------------------------------------------------- what crosses the wire


class _Capture:
    """Every frame on the loopback interface (an AF_PACKET socket: root), while running."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.data = bytearray()
        self.frames = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            self.frames += 1
            self.data += frame

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return bytes(self.data)


@pytest.mark.parametrize("security", ["curve", "hmac"])
def test_the_marker_crosses_the_wire_only_without_curve(secure_cluster, security, monkeypatch):
    """A map whose inputs, results and printed output carry a marker, captured on the interface: absent with
    curve, present with hmac (which shows the capture sees the traffic)."""
    assert os.geteuid() == 0, "the capture needs root (CI runs as root)"
    info = secure_cluster(2, security=security)
    rc = ipmtc.connect(info.profile)
    try:
        cap = _Capture()
        try:
            res = ipmtc.dynamic_map(_mark, [f"{MARKER}-in-{i}" for i in range(20)], client=rc, progress=False)
            rc[:].apply_sync(_mark, f"{MARKER}-apply")
        finally:
            seen = cap.stop()
        assert not res.failed
    finally:
        rc.close()
    assert cap.frames > 100, "the capture saw almost nothing"
    count = seen.count(MARKER.encode())
    if security == "curve":
        assert count == 0, f"the marker crossed the wire {count} times in clear"
    else:
        assert count > 20


# ---------------------------------------------------------------- files


def test_every_file_is_private_under_umask_000(secure_cluster, open_ipython_dir, tmp_path):
    old = os.umask(0)
    try:
        info = secure_cluster(2)
        rc = ipmtc.connect(info.profile)
        try:
            ipmtc.dynamic_map(_mark, range(4), client=rc, progress=False, journal=str(tmp_path / "j.db"))
        finally:
            rc.close()
        pdir = Path(info.profile_dir)
        for d in (pdir, pdir / "security", pdir / "log"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        for p in [*pdir.rglob("*"), *tmp_path.glob("j.db*")]:
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode & 0o077 == 0, f"{p} is {mode:04o}"
    finally:
        os.umask(old)


def test_a_profile_directory_others_may_enter_or_that_is_a_link_is_refused(open_ipython_dir, tmp_path):
    pdir = open_ipython_dir / "profile_shared-by-mistake"
    pdir.mkdir(mode=0o755)
    os.chmod(pdir, 0o755)
    with pytest.raises(SecurityError, match="open to other users .mode 0755.*chmod 700"):
        cluster.create_profile(profile="shared-by-mistake", flags={"launcher": "local"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (open_ipython_dir / "profile_linked").symlink_to(elsewhere)
    with pytest.raises(SecurityError, match="symbolic link"):
        cluster.create_profile(profile="linked", flags={"launcher": "local"})
    assert not any(elsewhere.iterdir())


def test_a_journal_someone_else_owns_or_may_write_is_refused_before_unpickling(tmp_path, other_user):
    pw, _, _ = other_user

    def square(x):
        return x * x

    db = tmp_path / "j.db"
    with Journal.open(db, fn=square) as j:
        j.flush()
    os.chmod(db, 0o666)
    with pytest.raises(JournalError, match="may be changed by other users"):
        Journal.open(db, fn=square)
    with pytest.raises(JournalError, match="may be changed by other users"):
        Journal.open(db, readonly=True)
    os.chmod(db, 0o600)
    os.chown(db, pw.pw_uid, pw.pw_gid)
    with pytest.raises(JournalError, match="belongs to uid"):
        Journal.open(db, fn=square)


# ---------------------------------------------------------------- secrets and listening sockets


def test_no_secret_in_argv_logs_or_status_and_nothing_listens_on_all_interfaces(secure_cluster):
    info = secure_cluster(2, log_level="DEBUG", security="curve")
    pdir = Path(info.profile_dir)
    conn = json.loads((pdir / "security" / "ipcontroller-engine.json").read_text())
    key = conn["key"]
    assert len(key) >= 32 and conn.get("curve_serverkey")
    rc = ipmtc.connect(info.profile)
    try:
        ipmtc.dynamic_map(_mark, range(4), client=rc, progress=False)
    finally:
        rc.close()
    for pid in info.pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert key.encode() not in f.read(), f"the key is in the command line of pid {pid}"
        except FileNotFoundError:
            pass
    for log in (pdir / "log").iterdir():
        assert key not in log.read_text(errors="replace"), f"the key is in {log.name}"
    st = cluster.status(info.profile)
    assert key not in json.dumps(st, default=str)
    ends = _listening(info.pids)
    assert ends and not [u for _, u in ends if u.startswith(("tcp://0.0.0.0:", "tcp://:::"))], ends
    assert not list(Path.cwd().glob("*.log")) and not list(Path.cwd().glob("*.sbatch"))


def test_each_start_has_fresh_keys(secure_cluster):
    keys = []
    for _ in range(2):
        info = secure_cluster(1, security="curve")
        conn = json.loads((Path(info.profile_dir) / "security" / "ipcontroller-client.json").read_text())
        keys.append((conn["key"], conn["curve_serverkey"]))
        cluster.stop(info.profile)
    assert keys[0][0] != keys[1][0] and keys[0][1] != keys[1][1]


def test_curve_needed_but_missing_fails_closed(monkeypatch, open_ipython_dir):
    monkeypatch.setattr(zmq, "has", lambda what: False if what == "curve" else True)
    with pytest.raises(SecurityError, match="needs CurveZMQ"):
        cluster.create_profile(profile="nocurve", flags={"launcher": "local", "security": "curve"})
    assert not (open_ipython_dir / "profile_nocurve").exists()


def test_a_profile_directory_with_an_acl_is_refused(open_ipython_dir, other_user):
    """An access control list can open a 0700 directory to another user: refused."""
    import struct

    pw, _, _ = other_user
    pdir = open_ipython_dir / "profile_acl"
    pdir.mkdir(mode=0o700)
    os.chmod(pdir, 0o700)
    any_id = 0xFFFFFFFF  # (the owner, group, mask and other entries name no one)

    def grant(mask: int) -> None:  # an entry for the other user; the mask is what the group bits show
        entries = [(0x01, 7, any_id), (0x02, 5, pw.pw_uid), (0x04, 0, any_id), (0x10, mask, any_id),
                   (0x20, 0, any_id)]
        value = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)  # POSIX ACL, v2
        os.setxattr(pdir, "system.posix_acl_access", value)

    grant(5)  # r-x for the other user: the group bits show it too
    with pytest.raises(SecurityError, match="open to other users .mode 0750"):
        cluster.create_profile(profile="acl", flags={"launcher": "local"})
    grant(0)  # masked to nothing today, mode 0700 -- one chmod g+rx away from letting the other user in
    assert stat.S_IMODE(pdir.stat().st_mode) == 0o700
    with pytest.raises(SecurityError, match="access control list"):
        cluster.create_profile(profile="acl", flags={"launcher": "local"})


def test_version_floors():
    """IPython >= 8.0.1 (CVE-2022-21699: startup files from the current directory), pyzmq >= 22.3 (curve)."""
    from importlib.metadata import version

    def tup(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())

    assert tup(version("ipython")) >= (8, 0, 1)
    assert tup(version("pyzmq")) >= (22, 3)
    assert zmq.has("curve")


def test_a_restart_after_a_killed_controller_replaces_the_key(secure_cluster):
    """SIGKILL the controller: the next start writes new connection files, and the old key is refused."""
    import signal

    import ipyparallel as ipp

    info = secure_cluster(1, security="hmac")
    pdir = Path(info.profile_dir)
    old = (pdir / "security" / "ipcontroller-client.json").read_text()
    stale = pdir.parent / "stale-client.json"
    stale.write_text(old)
    os.chmod(stale, 0o600)
    os.kill(info.controller_pid, signal.SIGKILL)
    wait_all_dead([info.controller_pid])
    info2 = cluster.start(engines=1, profile=info.profile, flags={"launcher": "local", "security": "hmac"})
    try:
        new = json.loads((pdir / "security" / "ipcontroller-client.json").read_text())
        assert new["key"] != json.loads(old)["key"]
        conn = json.loads(old)
        conn.update({k: new[k] for k in new if k not in ("key",)})  # the new ports, the old key
        stale.write_text(json.dumps(conn))
        with pytest.raises(TimeoutError, match="timed out"):
            ipp.Client(str(stale), timeout=3).close()
        rc = ipmtc.connect(info.profile)
        assert rc[:].apply_sync(os.getpid)
        rc.close()
    finally:
        stop_and_check(info2)
        stale.unlink()
