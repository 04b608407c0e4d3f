"""The driver-engine channel of dynamic_map: used where engines can dial back, applies where not,
and a listener that goes away loses nothing. Real engines, real sockets."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import ipyparallel as ipp
import pytest

import ipmtc
from ipmtc.maps import channel as chmod
from ipmtc.maps.channel import Channel


def sleepy(x):
    import time

    time.sleep(x)
    return x


def listeners():
    from ipmtc.maps import channel

    return sorted(channel._LISTENERS)


def close_listeners():
    from ipmtc.maps import channel

    for listener in list(channel._LISTENERS.values()):
        listener.close(bye=True)
    return len(channel._LISTENERS)


def wait_connected(ch, ids, timeout_s=10.0) -> set:
    """The engines' hellos come on their own socket, maybe after a short map's last result."""
    deadline = time.monotonic() + timeout_s
    while ch.connected != set(ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return ch.connected


def test_maps_go_over_the_channel_and_engines_stay_plain_engines(rc):
    res = ipmtc.dynamic_map(sleepy, [0.01] * 40, client=rc, progress=False)
    assert res.ok and list(res) == [0.01] * 40
    ch = Channel.for_client(rc)
    assert wait_connected(ch, rc.ids) == set(rc.ids) and not ch.results
    # the engines answer applies and %px as before, at once (no loop holds them)
    t0 = time.monotonic()
    assert all(ch.address in found for found in rc[:].apply_sync(listeners))
    assert time.monotonic() - t0 < 5
    rc[:].execute("z = 7", block=True)
    assert rc[:]["z"] == [7] * len(rc.ids)
    # a second map reuses the listeners: no new apply goes through ipyparallel for its chunks
    h0 = len(rc.history)
    res = ipmtc.dynamic_map(sleepy, [0.0] * 500, client=rc, progress=False)
    assert res.ok and len(rc.history) == h0


def test_engines_that_cannot_dial_back_get_applies(rc):
    ch = Channel.for_client(rc)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ch.address = f"tcp://127.0.0.1:{port}"
    res = ipmtc.dynamic_map(sleepy, [0.02] * 40, client=rc, progress=False)
    assert res.ok and list(res) == [0.02] * 40
    assert ch.connected == set()
    assert {r.engine_id for r in res.records} == set(rc.ids)


def test_a_listener_that_goes_away_loses_nothing(rc, shared_cluster):
    """Listeners closed mid-map (as after a long driver stall): its chunks run again, uncharged."""
    other = ipp.Client(profile=shared_cluster.profile)

    def close_midway():
        time.sleep(0.6)
        other[:].apply_async(close_listeners)

    ipmtc.dynamic_map(sleepy, [0.0] * 8, client=rc, progress=False)  # listeners up
    assert wait_connected(Channel.for_client(rc), rc.ids) == set(rc.ids)
    t = threading.Thread(target=close_midway)
    t.start()
    try:
        res = ipmtc.dynamic_map(sleepy, [0.05] * 120, client=rc, progress=False)
    finally:
        t.join()
        other.close()
    assert res.ok and list(res) == [0.05] * 120
    assert res.summary()["retries"] == 0 and all(r.attempts == 1 for r in res.records)
    ch = Channel.for_client(rc)
    assert ch.connected == set()  # every listener said bye
    assert any(r.resubmits for r in res.records)  # what was waiting on them ran again
    # the next map asks them to listen again
    res = ipmtc.dynamic_map(sleepy, [0.0] * 40, client=rc, progress=False)
    assert res.ok and wait_connected(ch, rc.ids) == set(rc.ids)


def test_listeners_close_when_their_driver_exits(rc, shared_cluster):
    script = textwrap.dedent(f"""
        import time, ipmtc, ipyparallel as ipp
        from ipmtc.maps.channel import Channel
        rc = ipp.Client(profile={shared_cluster.profile!r})
        res = ipmtc.dynamic_map(abs, range(-50, 0), client=rc, progress=False)
        assert res.ok
        ch = Channel.for_client(rc)
        deadline = time.monotonic() + 10
        while ch.connected != set(rc.ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ch.connected == set(rc.ids)
        print(ch.address)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    address = out.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(address in found for found in rc[:].apply_sync(listeners)):
        time.sleep(0.2)
    assert not any(address in found for found in rc[:].apply_sync(listeners))


def test_messages_not_signed_with_the_key_are_dropped():
    frames = chmod._pack(b"k" * 32, ("chunk", "m", "x"), [(0, 1)])
    assert chmod._unpack(b"k" * 32, frames)[0] == ("chunk", "m", "x")
    assert chmod._unpack(b"other-key" * 4, frames) is None
    tampered = [frames[0], frames[1], *[f + b"!" for f in frames[2:]]]
    assert chmod._unpack(b"k" * 32, tampered) is None


def test_an_input_that_cannot_be_sent_fails_alone(rc):
    """One unpicklable input among many: that task fails with the reason, the others run."""
    items = [1, 2, threading.Lock(), 4, 5, 6]
    res = ipmtc.dynamic_map(str, items, client=rc, chunksize=3, progress=False)
    assert [f.index for f in res.failed] == [2]
    assert "cannot be sent" in res.failed[0].evalue and "lock" in res.failed[0].evalue.lower()
    assert [res[i] for i in (0, 1, 3, 4, 5)] == ["1", "2", "4", "5", "6"]


def chatty(x):
    print("task", x, "says hello " * 50)
    import sys

    print("and warns", file=sys.stderr)
    return x


@pytest.mark.parametrize("path", ["channel", "applies"])
def test_what_tasks_print_does_not_pile_up_in_the_client(rc, path, monkeypatch):
    if path == "applies":  # there the output comes on IOPub, maybe after the chunk's result
        monkeypatch.setenv("IPMTC_DRIVER_IP", "off")
    res = ipmtc.dynamic_map(chatty, range(300), client=rc, progress=False)
    assert res.ok and list(res) == list(range(300))
    time.sleep(0.5)  # output, if any were sent, would arrive on the IOPub stream by now
    kept = sum(len(md.get("stdout") or "") + len(md.get("stderr") or "") for md in rc.metadata.values()
               if isinstance(md, dict))  # (ipyparallel also files a 'submitted' time there)
    assert kept < 1000 and len(rc.metadata) < 20


def test_a_function_the_engines_cannot_import_fails_its_tasks(rc, tmp_path, monkeypatch):
    """Over the channel as over applies: the tasks fail with the import error, the map ends."""
    (tmp_path / "only_on_the_driver.py").write_text("def f(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from only_on_the_driver import f

    ipmtc.dynamic_map(sleepy, [0.0] * 8, client=rc, progress=False)
    assert wait_connected(Channel.for_client(rc), rc.ids) == set(rc.ids)
    t0 = time.monotonic()
    res = ipmtc.dynamic_map(f, range(6), client=rc, progress=False)
    assert time.monotonic() - t0 < 30
    assert len(res.failed) == 6 and all("only_on_the_driver" in f.evalue for f in res.failed)


def set_orphan_s(value):
    from ipmtc.maps import channel

    channel.ORPHAN_AFTER_S = value


def test_a_long_chunk_is_not_the_drivers_silence(rc):
    """A listener counts silence from the end of its last chunk: long tasks keep the channel."""
    ipmtc.dynamic_map(sleepy, [0.0] * 8, client=rc, progress=False)
    ch = Channel.for_client(rc)
    assert wait_connected(ch, rc.ids) == set(rc.ids)
    rc[:].apply_sync(set_orphan_s, 1.5)  # tasks longer than the orphan time, pings every 2 s
    try:
        res = ipmtc.dynamic_map(sleepy, [2.5] * (3 * len(rc.ids)), client=rc, chunksize=1, progress=False)
        time.sleep(0.3)  # a bye said at the end would be in by now
        connected = set(ch.connected)
    finally:
        rc[:].apply_sync(set_orphan_s, chmod.ORPHAN_AFTER_S)
    assert res.ok and all(r.resubmits == 0 for r in res.records)
    assert connected == set(rc.ids)


def lock_for_3(x):
    import threading

    return threading.Lock() if x == 3 else x


def test_a_result_that_cannot_be_sent_back_fails_alone(rc):
    ipmtc.dynamic_map(sleepy, [0.0] * 8, client=rc, progress=False)
    assert wait_connected(Channel.for_client(rc), rc.ids) == set(rc.ids)
    res = ipmtc.dynamic_map(lock_for_3, range(8), client=rc, chunksize=4, progress=False)
    assert [f.index for f in res.failed] == [3] and "cannot be sent back" in res.failed[0].evalue
    assert [res[i] for i in (0, 1, 2, 4, 5, 6, 7)] == [0, 1, 2, 4, 5, 6, 7]
