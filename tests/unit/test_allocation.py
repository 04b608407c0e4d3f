"""Table-driven tests for ipmtc.allocation (pure: env dicts and tmp node files)."""

from __future__ import annotations

import pytest

from ipmtc.allocation import (
    Allocation,
    compress_hosts,
    detect,
    expand_hostlist,
    parse_tasks_per_node,
)
from ipmtc.errors import AllocationError, IpmtcError


def _detect(env: dict[str, str]) -> Allocation:
    return detect(env, cpu_count=8, hostname="laptop")


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2(x3),1", [2, 2, 2, 1]),
        ("16", [16]),
        ("4(x2)", [4, 4]),
        ("1,2,3", [1, 2, 3]),
        ("36(x2),18", [36, 36, 18]),
        (" 2(x2) ", [2, 2]),
    ],
)
def test_parse_tasks_per_node(value: str, expected: list[int]) -> None:
    assert parse_tasks_per_node(value) == expected


@pytest.mark.parametrize("value", ["", "x", "2(3)", "2(x)", "2(x3", "-1", "2,,1", "2.5"])
def test_parse_tasks_per_node_malformed(value: str) -> None:
    with pytest.raises(AllocationError, match="SLURM_TASKS_PER_NODE"):
        parse_tasks_per_node(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("node001", ["node001"]),
        ("n[01-04,07],gpu[1-2]", ["n01", "n02", "n03", "n04", "n07", "gpu1", "gpu2"]),
        ("c[1-2]-[1-2]", ["c1-1", "c1-2", "c2-1", "c2-2"]),
        ("cn[0001-0003]", ["cn0001", "cn0002", "cn0003"]),
        ("a1,b2", ["a1", "b2"]),
    ],
)
def test_expand_hostlist(value: str, expected: list[str]) -> None:
    assert expand_hostlist(value) == expected


def test_expand_hostlist_malformed() -> None:
    with pytest.raises(AllocationError, match=r"n\[1-"):
        expand_hostlist("n[1-")


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        (["n1", "n2", "n3", "n4"], "n[1-4]"),
        (["node001"], "node001"),
        (("cn0001", "cn0002", "cn0003"), "cn[0001-0003]"),
    ],
)
def test_compress_hosts(hosts: list[str], expected: str) -> None:
    assert compress_hosts(hosts) == expected


# --------------------------------------------------------------------------- slurm


@pytest.mark.parametrize(
    ("env", "hosts", "slots"),
    [
        (
            {"SLURM_JOB_NODELIST": "node001", "SLURM_TASKS_PER_NODE": "16"},
            ("node001",),
            (16,),
        ),
        (
            {"SLURM_JOB_NODELIST": "cn[0001-0003]", "SLURM_TASKS_PER_NODE": "2(x2),1"},
            ("cn0001", "cn0002", "cn0003"),
            (2, 2, 1),
        ),
        (
            {"SLURM_JOB_NODELIST": "n[01-02],gpu[1-2]", "SLURM_TASKS_PER_NODE": "2(x3),1"},
            ("n01", "n02", "gpu1", "gpu2"),
            (2, 2, 2, 1),
        ),
        (
            {"SLURM_JOB_NODELIST": "c[1-2]-[1-2]", "SLURM_TASKS_PER_NODE": "4(x4)"},
            ("c1-1", "c1-2", "c2-1", "c2-2"),
            (4, 4, 4, 4),
        ),
        (  # old-style variable only
            {"SLURM_NODELIST": "a[1-2]", "SLURM_TASKS_PER_NODE": "4(x2)"},
            ("a1", "a2"),
            (4, 4),
        ),
        (  # tasks-per-node disagrees with nodelist -> spread SLURM_NTASKS evenly
            {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "7"},
            ("n1", "n2", "n3"),
            (3, 2, 2),
        ),
        (  # no tasks-per-node, even spread
            {"SLURM_JOB_NODELIST": "n[1-4]", "SLURM_NTASKS": "16"},
            ("n1", "n2", "n3", "n4"),
            (4, 4, 4, 4),
        ),
        (  # only cpus on node
            {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_CPUS_ON_NODE": "48"},
            ("n1", "n2"),
            (48, 48),
        ),
        (  # nothing about tasks at all -> 1 per host
            {"SLURM_JOB_NODELIST": "n[1-2]"},
            ("n1", "n2"),
            (1, 1),
        ),
    ],
)
def test_detect_slurm(env: dict[str, str], hosts: tuple[str, ...], slots: tuple[int, ...]) -> None:
    alloc = _detect({"SLURM_JOB_ID": "123", **env})
    assert alloc == Allocation("slurm", "123", hosts, slots)
    assert alloc.is_batch
    assert alloc.n_hosts == len(hosts)
    assert alloc.total_slots == sum(slots)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x"}, "SLURM_TASKS_PER_NODE"),
        ({"SLURM_JOB_NODELIST": "n[1-"}, r"SLURM_JOB_NODELIST='n\[1-'"),
        ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "lots"}, "SLURM_NTASKS='lots'"),
        ({}, "SLURM_JOB_NODELIST"),
    ],
)
def test_detect_slurm_malformed(env: dict[str, str], match: str) -> None:
    with pytest.raises(AllocationError, match=match):
        _detect({"SLURM_JOB_ID": "123", **env})


def test_slurm_wins_over_pbs_and_lsf() -> None:
    env = {
        "SLURM_JOB_ID": "9",
        "SLURM_JOB_NODELIST": "s1",
        "PBS_JOBID": "1.pbs",
        "LSB_JOBID": "2",
        "LSB_HOSTS": "l1",
    }
    assert _detect(env).kind == "slurm"


# --------------------------------------------------------------------------- pbs


@pytest.mark.parametrize(
    ("lines", "hosts", "slots"),
    [
        (["n1"] * 4 + ["n2"] * 4, ("n1", "n2"), (4, 4)),
        (["n2", "n1", "n2", "n1", "n3"], ("n2", "n1", "n3"), (2, 2, 1)),  # interleaved
        (
            ["cn0001.cluster", "", "cn0001.cluster ", "cn0002.cluster"],
            ("cn0001.cluster", "cn0002.cluster"),
            (2, 1),
        ),
        (["solo"], ("solo",), (1,)),
    ],
)
def test_detect_pbs(
    tmp_path, lines: list[str], hosts: tuple[str, ...], slots: tuple[int, ...]
) -> None:
    nodefile = tmp_path / "nodes"
    nodefile.write_text("\n".join(lines) + "\n")
    alloc = _detect({"PBS_JOBID": "4242.pbs01", "PBS_NODEFILE": str(nodefile)})
    assert alloc == Allocation("pbs", "4242.pbs01", hosts, slots, nodefile=str(nodefile))


@pytest.mark.parametrize(
    ("nodefile", "match"),
    [
        (None, "PBS_NODEFILE is not set"),
        ("missing", "cannot read PBS_NODEFILE"),
        ("empty", "is empty"),
    ],
)
def test_detect_pbs_bad_nodefile(tmp_path, nodefile: str | None, match: str) -> None:
    env = {"PBS_JOBID": "7.pbs"}
    if nodefile is not None:
        path = tmp_path / nodefile
        if nodefile == "empty":
            path.write_text("\n")
        env["PBS_NODEFILE"] = str(path)
    with pytest.raises(AllocationError, match=match) as info:
        _detect(env)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- lsf


@pytest.mark.parametrize(
    ("env", "hosts", "slots"),
    [
        ({"LSB_MCPU_HOSTS": "hostA 4 hostB 4"}, ("hostA", "hostB"), (4, 4)),
        (
            {"LSB_MCPU_HOSTS": "batch1 1 c01n03 42 c01n04 42"},
            ("batch1", "c01n03", "c01n04"),
            (1, 42, 42),
        ),
        ({"LSB_MCPU_HOSTS": "a 2 b 1 a 1"}, ("a", "b"), (3, 1)),
        ({"LSB_HOSTS": "hostA hostA hostB hostA"}, ("hostA", "hostB"), (3, 1)),
        ({"LSB_MCPU_HOSTS": "m 2", "LSB_HOSTS": "x x x"}, ("m",), (2,)),  # MCPU preferred
    ],
)
def test_detect_lsf(env: dict[str, str], hosts: tuple[str, ...], slots: tuple[int, ...]) -> None:
    assert _detect({"LSB_JOBID": "555", **env}) == Allocation("lsf", "555", hosts, slots)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"LSB_MCPU_HOSTS": "hostA 4 hostB"}, "LSB_MCPU_HOSTS='hostA 4 hostB'"),
        ({"LSB_MCPU_HOSTS": "hostA four"}, "LSB_MCPU_HOSTS"),
        ({}, "LSB_MCPU_HOSTS nor LSB_HOSTS"),
    ],
)
def test_detect_lsf_malformed(env: dict[str, str], match: str) -> None:
    with pytest.raises(AllocationError, match=match):
        _detect({"LSB_JOBID": "555", **env})


# --------------------------------------------------------------------------- local / override


def test_detect_local() -> None:
    alloc = _detect({"HOME": "/home/me"})
    assert alloc == Allocation("local", None, ("laptop",), (8,))
    assert not alloc.is_batch
    assert alloc.describe() == "local: 1 node laptop, 8 slots"


def test_detect_local_defaults_from_machine() -> None:
    alloc = detect({})
    assert alloc.kind == "local"
    assert alloc.n_hosts == 1 and alloc.hosts[0]
    assert alloc.total_slots >= 1


def test_detect_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "IPMTC_ALLOCATION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LSB_JOBID", "77")
    monkeypatch.setenv("LSB_MCPU_HOSTS", "h1 2")
    assert detect() == Allocation("lsf", "77", ("h1",), (2,))


@pytest.mark.parametrize(
    "batch_env",
    [
        {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-4]"},
        {"PBS_JOBID": "2.pbs", "PBS_NODEFILE": "/nonexistent/nodefile"},
        {"LSB_JOBID": "3", "LSB_MCPU_HOSTS": "odd"},
    ],
)
@pytest.mark.parametrize("value", ["local", "LOCAL", " local "])
def test_override_local(batch_env: dict[str, str], value: str) -> None:
    alloc = _detect({**batch_env, "IPMTC_ALLOCATION": value})
    assert alloc == Allocation("local", None, ("laptop",), (8,))


def test_override_auto_and_unknown() -> None:
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"}
    assert _detect({**env, "IPMTC_ALLOCATION": "auto"}).kind == "slurm"
    with pytest.raises(AllocationError, match="IPMTC_ALLOCATION='pbs'"):
        _detect({**env, "IPMTC_ALLOCATION": "pbs"})


# --------------------------------------------------------------------------- Allocation methods

SLURM4 = Allocation("slurm", "123", ("n1", "n2", "n3", "n4"), (4, 4, 4, 4))


@pytest.mark.parametrize(
    ("alloc", "expected"),
    [
        (SLURM4, "slurm job 123: 4 nodes n[1-4], 16 slots"),
        (Allocation("pbs", "9.pbs", ("a1",), (1,)), "pbs job 9.pbs: 1 node a1, 1 slot"),
        (Allocation("local", None, ("box",), (12,)), "local: 1 node box, 12 slots"),
    ],
)
def test_describe(alloc: Allocation, expected: str) -> None:
    assert alloc.describe() == expected


@pytest.mark.parametrize(
    ("n", "hosts", "slots"), [(1, ("n1",), (4,)), (3, ("n1", "n2", "n3"), (4, 4, 4))]
)
def test_first(n: int, hosts: tuple[str, ...], slots: tuple[int, ...]) -> None:
    sub = SLURM4.first(n)
    assert sub == Allocation("slurm", "123", hosts, slots)
    assert sub.total_slots == sum(slots)


def test_first_all_keeps_nodefile_subset_drops_it() -> None:
    pbs = Allocation("pbs", "1", ("a", "b"), (2, 2), nodefile="/tmp/nodes")
    assert pbs.first(2) is pbs
    assert pbs.first(1).nodefile is None


@pytest.mark.parametrize(
    ("alloc", "n", "message"),
    [
        (
            SLURM4,
            5,
            "--nodes 5 but this slurm allocation 123 has 4 nodes (n[1-4]); ask for at most 4",
        ),
        (SLURM4, 0, "--nodes 0 is invalid; ask for at least 1 node"),
        (SLURM4, -2, "--nodes -2 is invalid; ask for at least 1 node"),
        (
            Allocation("local", None, ("box",), (8,)),
            2,
            "--nodes 2 but the local machine has 1 node (box); "
            "ask for at most 1 (or run inside a batch job)",
        ),
    ],
)
def test_first_bounds(alloc: Allocation, n: int, message: str) -> None:
    with pytest.raises(AllocationError) as info:
        alloc.first(n)
    assert str(info.value) == message
    assert isinstance(info.value, IpmtcError)


def test_allocation_is_frozen_and_validated() -> None:
    with pytest.raises(AttributeError):
        SLURM4.kind = "pbs"  # type: ignore[misc]
    with pytest.raises(AllocationError):
        Allocation("slurm", "1", ("a", "b"), (1,))
