"""The one seam to ipyparallel's (and ipykernel's) private internals.

ipmtc stays plain IPython Parallel underneath, but a few of its speed-ups and
its bounded memory need things ipyparallel does not offer publicly. Every such
use lives here, each with what it relies on, so that an ipyparallel release
that changes them breaks one module, and ``tests/integration/test_ipp_seam.py``
(which exercises each function below against the installed version) says which.
The dependency is pinned ``ipyparallel>=9,<10`` for the same reason.

Public API (``Client``, views, ``Cluster``, ``ipyparallel.serialize``,
``datapub.publish_data``) is used directly elsewhere; only underscored or
undocumented names come through here.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- driver side: the Client


def engine_of_reply(client: Any, msg_id: str, ar: Any) -> int | None:
    """The engine id that answered ``msg_id`` (None if not known yet).

    Relies on: ``client.metadata[msg_id]`` (public) being dropped by ipyparallel
    once reply and output are in, while ``AsyncResult._metadata`` keeps a reference
    to the same record; and ``Client._engines`` (id -> uuid), because the reply can
    be handled before ipyparallel fills ``engine_id`` in from ``engine_uuid``.
    """
    md = client.metadata.get(msg_id)
    if not md and ar is not None:
        mds = getattr(ar, "_metadata", None)
        md = mds[0] if mds else None
    md = md or {}
    eid = md.get("engine_id")
    if eid is None and md.get("engine_uuid"):
        eid = next((i for i, u in client._engines.items() if u == md["engine_uuid"]), None)
    return eid


def forget_result(client: Any, msg_id: str) -> None:
    """Drop the client's copies of a handed-back result (bounded memory over millions of tasks).

    Relies on: ``Client.results``/``metadata`` (public dicts) and the private
    ``Client._futures`` and ``Client._output_futures`` (msg_id -> futures). The
    metadata stays while the task's printed output is still on its way:
    ipyparallel drops it (and its output future) once the engine's ``idle``
    arrives, and dropped earlier, the late output would recreate the entry for good.
    """
    client.results.pop(msg_id, None)
    client._futures.pop(msg_id, None)
    out = client._output_futures.get(msg_id)
    if out is None or out.done():
        client.metadata.pop(msg_id, None)
        client._output_futures.pop(msg_id, None)


def purge_hub_nowait(client: Any, msg_ids: list[str]) -> None:
    """Ask the hub to drop its copies of ``msg_ids`` without waiting for its answer.

    Relies on: ``Client._send(Client._query_stream, "purge_request", content=...)``,
    the message ``Client.purge_hub_results`` sends before it blocks for the reply
    (a hub round trip per purge would sit inside every map's wall time). Falls back
    to the public, blocking call where those are missing.
    """
    if hasattr(client, "_send") and hasattr(client, "_query_stream"):
        client._send(client._query_stream, "purge_request", content={"engine_ids": [], "msg_ids": msg_ids})
    else:
        client.purge_hub_results(jobs=msg_ids)


def controller_host(client: Any) -> str | None:
    """The host part of the controller's address as the client knows it; None when behind an ssh tunnel.

    Relies on: ``Client._ssh`` (set when the client tunnels) and ``Client._config["interface"]``
    (``tcp://<address>`` from the connection file).
    """
    if getattr(client, "_ssh", False):
        return None
    cfg = getattr(client, "_config", None) or {}
    return str(cfg.get("interface", "")).split("://", 1)[-1].strip("[]") or None


def uses_curve(client: Any) -> bool:
    """Whether ``client``'s cluster runs CurveZMQ (its connection file named the controller's server key).

    Relies on: ``Client.curve_serverkey`` (a configurable trait, filled from the connection file).
    """
    return bool(getattr(client, "curve_serverkey", None))


def hub_probe_socket(client: Any, context: Any) -> Any:
    """A new DEALER socket, in ``context``, connected where ``client`` sends its hub queries.

    For telling whether the controller still answers (ipyparallel's own queries
    block without a timeout). Relies on: ``Client._query_socket`` (its
    ``LAST_ENDPOINT`` is the registration address, or the local end of the ssh
    tunnel to it) and the client's ``curve_*`` key attributes, copied over.
    """
    import zmq

    endpoint = client._query_socket.getsockopt(zmq.LAST_ENDPOINT).decode()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    serverkey = getattr(client, "curve_serverkey", None)
    if serverkey:
        sock.curve_serverkey = serverkey
        sock.curve_secretkey = client.curve_secretkey
        sock.curve_publickey = client.curve_publickey
    sock.connect(endpoint)
    return sock


# ---------------------------------------------------------------- engine side: the kernel


def engine_kernel() -> Any:
    """The running engine's kernel (``IPythonParallelKernel``).

    Relies on: ``get_ipython().kernel`` and its attributes ``session.key`` (the
    cluster's HMAC key), ``engine_id`` and ``io_loop`` (the engine's tornado loop),
    which ipyparallel sets on the kernel it creates but does not document.
    """
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        raise RuntimeError("not inside an IPython Parallel engine")
    return shell.kernel


def kernel_parts(kernel: Any) -> tuple[bytes, int, Any]:
    """``(session key, engine id, io_loop)`` of an engine's kernel (see :func:`engine_kernel`)."""
    return kernel.session.key, kernel.engine_id, kernel.io_loop


def captured_fd_copy(stream: Any) -> int | None:
    """The real fd 1/2 behind ipykernel's output capture, or None when fds are not captured.

    Relies on: ipykernel's ``OutStream._original_stdstream_copy`` (a dup of the
    original fd, kept while ``capture_fd_output`` redirects fds 1/2 into a pipe).
    """
    return getattr(stream, "_original_stdstream_copy", None)


def install_nanny_starter(start_nanny: Callable[..., tuple[str, Any]]) -> None:
    """Make ipyparallel's engine start its nanny with ``start_nanny`` instead of a fresh Python.

    Relies on: ``ipyparallel.engine.app`` calling the module-level name
    ``start_nanny(**kwargs) -> (nanny_url, handle)`` (imported from ``.nanny``),
    with the keyword arguments ``nanny.start_nanny`` pickles to its child.
    """
    from ipyparallel.engine import app

    app.start_nanny = start_nanny


def nanny_main(**kwargs: Any) -> None:
    """Run ipyparallel's nanny in this (forked) process, as ``python -m ipyparallel.engine.nanny`` would.

    Relies on: ``KernelNanny.main(**kwargs)`` with ``pipe`` (the text stream its
    URL is written to) added to the kwargs ``start_nanny`` sends.
    """
    from ipyparallel.engine import nanny

    nanny.KernelNanny.main(**kwargs)


# ---------------------------------------------------------------- processes of a Cluster


def launcher_pids(cluster: Any) -> list[int]:
    """PIDs of a started ``ipyparallel.Cluster``'s launchers: the controller first, then engine launchers.

    Relies on: ``Cluster.controller.pid``, ``Cluster.engines`` (engine set id ->
    launcher) and, for multi-process engine sets, the undocumented
    ``launchers`` dict of ``MPIEngineSetLauncher``'s relatives.
    """
    pids = []
    if cluster.controller is not None and cluster.controller.pid > 0:
        pids.append(cluster.controller.pid)
    for es in cluster.engines.values():
        subs = getattr(es, "launchers", None)
        if subs:
            pids += [el.pid for el in subs.values() if el.pid > 0]
        elif getattr(es, "pid", -1) > 0:
            pids.append(es.pid)
    return pids


def cluster_file(profile_dir: str | Path, cluster_id: str = "") -> Path:
    """Where ipyparallel keeps a cluster's state: ``<profile>/security/cluster-<id>.json``."""
    return Path(profile_dir) / "security" / f"cluster-{cluster_id}.json"


def cluster_file_pids(profile_dir: str | Path) -> list[int]:
    """PIDs ipyparallel recorded in its cluster file (engines added later included).

    Relies on: the file's layout (``controller.state.pid``,
    ``engines.sets.<id>.pid`` and ``engines.sets.<id>.engines.<n>.pid``), which
    ``Cluster.to_dict`` writes and does not document.
    """
    try:
        d = json.loads(cluster_file(profile_dir).read_text())
    except (OSError, ValueError):
        return []
    pids: list[Any] = [d.get("controller", {}).get("state", {}).get("pid", -1)]
    for es in d.get("engines", {}).get("sets", {}).values():
        pids.append(es.get("pid", -1))
        pids += [e.get("pid", -1) for e in es.get("engines", {}).values()]
    return [p for p in pids if isinstance(p, int) and p > 0]


__all__ = [
    "captured_fd_copy", "cluster_file", "cluster_file_pids", "controller_host", "engine_kernel", "engine_of_reply",
    "forget_result", "hub_probe_socket", "install_nanny_starter", "kernel_parts", "launcher_pids", "nanny_main",
    "purge_hub_nowait",
]


def profile_dir_of(client: Any) -> str | None:
    """The profile folder a ``Client`` was connected through (None: given connection info directly).

    Relies on: the private ``Client._profile_dir`` (an IPython ``ProfileDir`` or None).
    """
    pd = getattr(client, "_profile_dir", None)
    return getattr(pd, "location", None)
