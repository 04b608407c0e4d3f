"""Every seam of ``ipmtc/_ipp.py`` against the installed ipyparallel / ipykernel.

When a release moves one of the private internals ipmtc relies on, the test of
that seam fails here with its name, instead of a map misbehaving somewhere else.
"""
from __future__ import annotations

import os
import sys

import ipyparallel
import pytest

from ipmtc import _ipp, cluster

from .._wait import wait_for


def _engine_view_of_kernel():
    from ipmtc import _ipp as seam

    key, engine_id, io_loop = seam.kernel_parts(seam.engine_kernel())
    return key, engine_id, callable(getattr(io_loop, "add_callback", None))


def _captured_fd():
    import os as _os
    import sys as _sys

    from ipmtc import _ipp as seam

    fd = seam.captured_fd_copy(_sys.stdout)
    return fd, (fd is not None and _os.fstat(fd) is not None)


def test_pinned_major_is_installed():
    assert ipyparallel.__version__.split(".")[0] == "9", "pyproject pins ipyparallel>=9,<10"


def test_engine_of_reply_forget_result_and_nowait_purge(rc):
    target = rc.ids[-1]
    ar = rc[target].apply_async(os.getpid)
    ar.get(timeout=30)
    mid = ar.msg_ids[0]
    assert _ipp.engine_of_reply(rc, mid, ar) == target
    # once ipyparallel drops the client's metadata, the AsyncResult's own reference still says where
    rc.metadata.pop(mid, None)
    assert _ipp.engine_of_reply(rc, mid, ar) == target

    out = rc._output_futures.get(mid)
    output_in = out is None or out.done()  # read before: forgetting may drop the future
    _ipp.forget_result(rc, mid)
    assert mid not in rc.results and mid not in rc._futures
    if output_in:
        assert mid not in rc.metadata and mid not in rc._output_futures
    else:  # the task's output is still on its way: its metadata stays (a late output would recreate it)
        assert mid in rc._output_futures

    # the hub (DictDB) records the reply from its monitor stream, possibly after the client got it:
    # purge once the hub holds the completed task, or the late record would come back
    wait_for(lambda: any(r.get("completed") for r in rc.db_query({"msg_id": mid}, keys=["msg_id", "completed"])),
             30, "the hub to record the reply")
    _ipp.purge_hub_nowait(rc, [mid])
    wait_for(lambda: not rc.db_query({"msg_id": mid}, keys=["msg_id"]), 30, "the hub to purge the task")


def test_controller_host(rc):
    assert _ipp.controller_host(rc) in ("127.0.0.1", "localhost")


def test_kernel_parts_on_an_engine(rc):
    key, engine_id, has_loop = rc[rc.ids[0]].apply_sync(_engine_view_of_kernel)
    assert key == rc.session.key and engine_id == rc.ids[0] and has_loop


def test_engine_kernel_outside_an_engine_says_so():
    with pytest.raises(RuntimeError, match="not inside"):
        _ipp.engine_kernel()


def test_nanny_seams_match_the_engine_app():
    from ipyparallel.engine import app, nanny

    # IPEngine.start_nanny calls the module-level name that install_nanny_starter replaces
    assert "start_nanny" in app.IPEngine.start_nanny.__code__.co_names
    assert callable(app.start_nanny)
    assert isinstance(nanny.KernelNanny.__dict__["main"], classmethod)
    saved = app.start_nanny
    try:
        marker = lambda **kw: ("url", None)  # noqa: E731
        _ipp.install_nanny_starter(marker)
        assert app.start_nanny is marker
    finally:
        app.start_nanny = saved


def test_launcher_pids_cluster_file_pids_and_captured_fd(start_cluster, monkeypatch):
    # ipykernel leaves fds 1/2 alone under pytest (it looks for PYTEST_CURRENT_TEST): engines started
    # without it capture them as they do for users
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    info = start_cluster(2)
    assert info.launcher_pids[0] == info.controller_pid and len(info.launcher_pids) >= 2
    recorded = _ipp.cluster_file_pids(info.profile_dir)
    assert info.controller_pid in recorded
    assert set(info.launcher_pids) <= set(recorded)

    client = cluster.connect(info.profile)
    try:
        client.wait_for_engines(2, timeout=30)
        fd, valid = client[client.ids[0]].apply_sync(_captured_fd)
    finally:
        client.close()
    # the copy of the real fd 1 that ipykernel's capture keeps is an open fd
    assert isinstance(fd, int) and valid
    assert _ipp.captured_fd_copy(sys.__stdout__) is None  # a plain stream has no capture
