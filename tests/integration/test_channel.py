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
from ipmtc.maps import wire
from ipmtc.maps.channel import Channel

from .._wait import Background, wait_for


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
    assert all(ch.address in found for found in rc[:].apply_async(listeners).get(timeout=30))
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


def close_listeners_when(gate, inside):
    """An apply that holds its engine until ``gate`` exists (a file in ``inside`` says it started),
    then closes the engine's listeners: what the driver placed on them meanwhile is never run there."""
    import os
    import time

    from ipmtc.maps import channel

    open(os.path.join(inside, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 120  # the test opens the gate long before, or has failed
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    for listener in list(channel._LISTENERS.values()):
        listener.close(bye=True)
    return len(channel._LISTENERS)


def test_a_listener_that_goes_away_loses_nothing(rc, shared_cluster, tmp_path):
    """Listeners closed mid-map (as after a long driver stall): the chunks placed on them run again, uncharged.

    Mid-map by construction: each engine is held in an apply (from another client) that closes its
    listener once the test opens a gate, and the gate opens once the map has a chunk on every listener.
    """
    other = ipp.Client(profile=shared_cluster.profile)
    gate, inside = tmp_path / "gate", tmp_path / "inside"
    inside.mkdir()
    ipmtc.dynamic_map(sleepy, [0.0] * 8, client=rc, progress=False)  # listeners up
    ch = Channel.for_client(rc)
    assert wait_connected(ch, rc.ids) == set(rc.ids)

    def placed() -> set:  # engines with a chunk sent to their listener and not answered
        return {r.engine_id for r in list(ch.results.values()) if not r.ready()}

    def open_when_placed():
        try:
            wait_for(lambda: placed() == set(rc.ids), 60, lambda: f"a chunk on every listener (have {placed()})")
        finally:
            gate.touch()  # (also when that failed: the map must not hang)

    held = other[:].apply_async(close_listeners_when, str(gate), str(inside))
    opener = Background(open_when_placed)
    try:
        wait_for(lambda: len(os.listdir(inside)) == len(rc.ids), 60, "every engine held by the closing apply")
        opener.start()
        res = ipmtc.dynamic_map(sleepy, [0.05] * 120, client=rc, progress=False)
    finally:
        gate.touch()
        if opener.ident is not None:  # started
            opener.check()
        held.get(timeout=60)
        other.close()
    assert res.ok and list(res) == [0.05] * 120
    assert res.summary()["retries"] == 0 and all(r.attempts == 1 for r in res.records)
    # every bye handled: the listener neither connected nor asked (so the next map asks it again)
    wait_for(lambda: not ch.connected and not ch.asked, 30,
             lambda: f"every listener's bye (still connected: {ch.connected}, asked: {ch.asked})")
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
    wait_for(lambda: not any(address in found for found in rc[:].apply_sync(listeners)), 10,
             f"the listeners of {address} to close")


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


BARRIER = "ipmtc-test: output barrier"


def say_barrier():
    print("ipmtc-test: output barrier", flush=True)


@pytest.mark.parametrize("path", ["channel", "applies"])
def test_what_tasks_print_does_not_pile_up_in_the_client(rc, path, monkeypatch):
    if path == "applies":  # there the output comes on IOPub, maybe after the chunk's result
        monkeypatch.setenv("IPMTC_DRIVER_IP", "off")
    res = ipmtc.dynamic_map(chatty, range(300), client=rc, progress=False)
    assert res.ok and list(res) == list(range(300))
    # a barrier: each engine's IOPub messages come in order, so once its BARRIER line is here, whatever
    # the tasks' printing sent before it is here too
    barrier = rc[:].apply_async(say_barrier)
    barrier.get(timeout=60)
    wait_for(lambda: all(BARRIER in out for out in barrier.stdout), 30, "every engine's barrier line on IOPub")
    # (ipyparallel drops a message's client.metadata once its reply and output are in; the AsyncResult
    # keeps its own: the barrier's output is read there, less its line, in case the tasks' was filed there)
    mine = set(barrier.msg_ids)
    others = [md for mid, md in list(rc.metadata.items()) if mid not in mine and isinstance(md, dict)]
    kept = sum(len(md.get("stdout") or "") + len(md.get("stderr") or "") for md in others + barrier._metadata)
    kept -= len(BARRIER + "\n") * len(mine)
    assert kept < 1000 and len(others) < 20


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
    from ipmtc.maps import wire

    wire.ORPHAN_AFTER_S = value


def test_a_long_chunk_is_not_the_drivers_silence(rc, monkeypatch):
    """A listener counts silence from the end of its last chunk: long tasks keep the channel.

    The driver pings every 0.2 s here, so an idle listener never goes 2 s without hearing it; a bye
    (said after a chunk longer than that) shows as a chunk that had to run again or went as an apply,
    in this map or in the next one, which needs every listener again.
    """
    # read by the channel's thread (made in this client's first map): where it is defined and where used
    monkeypatch.setattr(wire, "PING_EVERY_S", 0.2)
    monkeypatch.setattr(chmod, "PING_EVERY_S", 0.2)
    ipmtc.dynamic_map(sleepy, [0.0] * 8, client=rc, progress=False)
    ch = Channel.for_client(rc)
    assert wait_connected(ch, rc.ids) == set(rc.ids)
    rc[:].apply_sync(set_orphan_s, 2.0)  # tasks longer than the orphan time
    try:
        h0 = len(rc.history)
        res = ipmtc.dynamic_map(sleepy, [2.5] * (3 * len(rc.ids)), client=rc, chunksize=1, progress=False)
        after = ipmtc.dynamic_map(sleepy, [0.0] * (2 * len(rc.ids)), client=rc, progress=False)
        applies = len(rc.history) - h0  # a listener gone: its chunks (or its new attach) go as applies
        connected = set(ch.connected)
    finally:
        rc[:].apply_sync(set_orphan_s, chmod.ORPHAN_AFTER_S)
    assert res.ok and all(r.resubmits == 0 for r in res.records)
    assert after.ok and all(r.resubmits == 0 for r in after.records)
    assert applies == 0 and connected == set(rc.ids)


def lock_for_3(x):
    import threading

    return threading.Lock() if x == 3 else x


def test_a_result_that_cannot_be_sent_back_fails_alone(rc):
    ipmtc.dynamic_map(sleepy, [0.0] * 8, client=rc, progress=False)
    assert wait_connected(Channel.for_client(rc), rc.ids) == set(rc.ids)
    res = ipmtc.dynamic_map(lock_for_3, range(8), client=rc, chunksize=4, progress=False)
    assert [f.index for f in res.failed] == [3] and "cannot be sent back" in res.failed[0].evalue
    assert [res[i] for i in (0, 1, 2, 4, 5, 6, 7)] == [0, 1, 2, 4, 5, 6, 7]


def _leave_marker(args):
    import os
    import uuid

    folder, x = args
    with open(os.path.join(folder, f"{x}-{uuid.uuid4().hex}"), "w"):
        pass
    return x


def test_a_replayed_chunk_runs_once(rc, tmp_path, monkeypatch):
    """A chunk message that reaches a listener twice (replayed, duplicated) is dropped: each task runs once."""
    ipmtc.dynamic_map(abs, range(8), client=rc, progress=False)  # the listeners attach
    wait_connected(chmod._CHANNELS[rc], set(rc.ids))
    post, doubled = Channel._post, []

    def twice(self, frames):
        post(self, frames)
        if frames[0] == b"chunk" and len(doubled) < 2:  # the same bytes again, right behind
            doubled.append(frames)
            post(self, frames)

    monkeypatch.setattr(Channel, "_post", twice)
    marks = tmp_path / "marks"
    marks.mkdir()
    res = ipmtc.dynamic_map(_leave_marker, [(str(marks), i) for i in range(12)], client=rc, progress=False,
                            chunksize=3)
    assert list(res) == list(range(12)) and len(doubled) == 2
    # a map after the duplicates: the listeners took them in before its chunks
    assert list(ipmtc.dynamic_map(_leave_marker, [(str(marks), 100)], client=rc, progress=False)) == [100]
    runs = sorted(int(p.name.split("-")[0]) for p in marks.iterdir())
    assert runs == [*range(12), 100], runs
