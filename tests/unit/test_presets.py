"""Tests for ipmtc.presets: precedence, sources, auto rules, errors, YAML output.

Pure: ``resolve`` gets explicit ``environ`` dicts; preset files live in tmp_path.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from ipmtc import presets as P
from ipmtc.errors import IpmtcError, PresetError
from ipmtc.presets import FIELDS, Preset, auto_values, concretize, resolve, to_yaml

BUILTINS = ["debug", "dynamic", "large", "static"]


@pytest.fixture(autouse=True)
def _own_ipython_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    for var in [v for v in os.environ if v.startswith("IPMTC_")]:
        monkeypatch.delenv(var)


def _file(tmp_path, text: str, name: str = "mine.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert isinstance(e.value, IpmtcError)
    return msg


# --------------------------------------------------------------------------- built-ins


def test_builtin_names() -> None:
    assert P.builtin_names() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_loads_and_concretizes(name: str) -> None:
    r = resolve(name, {}, {})
    assert r.name == name
    assert r.preset.description  # every built-in says what it is for
    assert r.sources["description"] == f"built-in '{name}'"
    c = concretize(r, 16)
    for key in ("heartbeat_period_ms", "heartbeat_misses", "engine_heartbeat_misses",
                "registration_timeout_s", "engine_timeout_s", "start_timeout_s"):
        assert getattr(c.preset, key) != "auto", key


def test_large_preset_values() -> None:
    p = resolve("large", {}, {}).preset
    assert p.task_db == "none"
    assert p.heartbeat_period_ms == 30000
    assert p.heartbeat_misses == 10
    assert p.registration_timeout_s == 600.0
    assert p.engine_timeout_s == 600.0
    assert p.log_level == "WARN"
    # a fixed 30 s heartbeat is not replaced by the auto rule, even for 2 engines
    assert concretize(resolve("large", {}, {}), 2).preset.heartbeat_period_ms == 30000


def test_static_and_dynamic_and_debug() -> None:
    assert resolve("static", {}, {}).preset.hwm == 0
    dyn = resolve("dynamic", {}, {}).preset
    assert (dyn.scheme, dyn.hwm, dyn.task_db) == ("leastload", 1, "dict")
    dbg = resolve("debug", {}, {}).preset
    assert (dbg.log_level, dbg.task_db) == ("DEBUG", "sqlite")


def test_default_preset_is_dynamic() -> None:
    r = resolve(None, {}, {})
    assert r.name == "dynamic"
    assert r.sources["hwm"] == "built-in 'dynamic'"


# --------------------------------------------------------------------------- precedence


def test_sources_default_and_builtin() -> None:
    r = resolve("dynamic", {}, {})
    assert r.sources["scheme"] == "built-in 'dynamic'"
    assert "log_level" not in r.sources  # dynamic.yaml does not set it
    rows = {k: (v, src) for k, v, src in r.rows()}
    assert rows["log_level"] == ("INFO", "default")
    assert rows["start_timeout_s"] == ("auto", "default")
    assert rows["mpi_args"] == ((), "default")
    assert [k for k, _, _ in r.rows()] == list(FIELDS)


def test_precedence_flag_env_file_builtin_default(tmp_path) -> None:
    path = _file(tmp_path, "hwm: 0\nscheme: lru\nheartbeat_misses: 7\n")
    env = {"IPMTC_HWM": "5", "IPMTC_SCHEME": "twobin"}
    flags = {"hwm": 3}
    r = resolve(str(path), flags, env)
    p, s = r.preset, r.sources
    assert r.name == "mine"
    assert (p.hwm, s["hwm"]) == (3, "flag --hwm")  # flag > env > file
    assert (p.scheme, s["scheme"]) == ("twobin", "env IPMTC_SCHEME")  # env > file
    assert (p.heartbeat_misses, s["heartbeat_misses"]) == (7, f"file {path}")  # file > built-in
    assert (p.task_db, s["task_db"]) == ("dict", "built-in 'dynamic'")  # built-in (extends default)
    assert p.log_level == "INFO" and "log_level" not in s  # default


def test_file_with_extends(tmp_path) -> None:
    path = _file(tmp_path, "extends: large\nhwm: 0\n")
    r = resolve(str(path), {}, {})
    assert (r.preset.hwm, r.sources["hwm"]) == (0, f"file {path}")
    assert (r.preset.heartbeat_period_ms, r.sources["heartbeat_period_ms"]) == (30000, "built-in 'large'")
    assert (r.preset.task_db, r.sources["task_db"]) == ("none", "built-in 'large'")
    assert "extends" not in r.sources


def test_file_without_extends_builds_on_dynamic(tmp_path) -> None:
    r = resolve(str(_file(tmp_path, "task_db: sqlite\n")), {}, {})
    assert r.preset.heartbeat_period_ms == "auto"
    assert r.sources["heartbeat_period_ms"] == "built-in 'dynamic'"
    assert r.preset.task_db == "sqlite"


def test_empty_file_is_its_base(tmp_path) -> None:
    r = resolve(str(_file(tmp_path, "# nothing\n", "empty.yml")), {}, {})
    assert r.name == "empty"
    assert r.preset == resolve("dynamic", {}, {}).preset


def test_env_beats_builtin_and_flag_beats_env() -> None:
    r = resolve("large", {}, {"IPMTC_HEARTBEAT_PERIOD_MS": "1000"})
    assert (r.preset.heartbeat_period_ms, r.sources["heartbeat_period_ms"]) == (
        1000, "env IPMTC_HEARTBEAT_PERIOD_MS")
    r = resolve("large", {"heartbeat_period_ms": "2000"}, {"IPMTC_HEARTBEAT_PERIOD_MS": "1000"})
    assert (r.preset.heartbeat_period_ms, r.sources["heartbeat_period_ms"]) == (
        2000, "flag --heartbeat-period-ms")


def test_none_flags_are_ignored() -> None:
    r = resolve("static", {"hwm": None, "launcher": None}, {"IPMTC_HWM": "4"})
    assert (r.preset.hwm, r.sources["hwm"]) == (4, "env IPMTC_HWM")
    assert r.sources["launcher"] == "built-in 'static'"


def test_env_values_are_converted() -> None:
    env = {"IPMTC_MPI_ARGS": "--bind-to core -x 'A B'", "IPMTC_LOG_LEVEL": "debug",
           "IPMTC_ENGINES_PER_NODE": "8", "IPMTC_REGISTRATION_TIMEOUT_S": "12.5",
           "IPMTC_CONTROLLER_IP": "10.0.0.1", "IPMTC_DESCRIPTION": "ignored",
           "IPMTC_UNRELATED": "x"}
    r = resolve("dynamic", {}, env)
    p = r.preset
    assert p.mpi_args == ("--bind-to", "core", "-x", "A B")
    assert p.log_level == "DEBUG"
    assert p.engines_per_node == 8
    assert p.registration_timeout_s == 12.5
    assert p.controller_ip == "10.0.0.1"
    assert p.description != "ignored"
    assert r.sources["engines_per_node"] == "env IPMTC_ENGINES_PER_NODE"


def test_auto_is_case_insensitive_and_allowed_where_documented() -> None:
    r = resolve("large", {"heartbeat_period_ms": "AUTO", "engines_per_node": " auto "}, {})
    assert r.preset.heartbeat_period_ms == "auto"
    assert r.preset.engines_per_node == "auto"
    assert resolve("dynamic", {"launcher": "auto"}, {}).preset.launcher == "auto"


def test_ipmtc_preset_env_selects_preset(tmp_path) -> None:
    r = resolve(None, {}, {"IPMTC_PRESET": "large"})
    assert r.name == "large"
    assert r.preset.task_db == "none"
    # an explicit preset wins over IPMTC_PRESET
    assert resolve("static", {}, {"IPMTC_PRESET": "large"}).name == "static"
    # IPMTC_PRESET may name a file
    path = _file(tmp_path, "extends: static\nscheme: lru\n", "site.yaml")
    r = resolve(None, {}, {"IPMTC_PRESET": str(path)})
    assert (r.name, r.preset.hwm, r.preset.scheme) == ("site", 0, "lru")


def test_resolve_reads_os_environ_by_default(monkeypatch) -> None:
    monkeypatch.setenv("IPMTC_PRESET", "static")
    monkeypatch.setenv("IPMTC_TASK_DB", "none")
    r = resolve()
    assert (r.name, r.preset.hwm, r.preset.task_db) == ("static", 0, "none")
    assert r.sources["task_db"] == "env IPMTC_TASK_DB"


# --------------------------------------------------------------------------- auto rules

AUTO_TABLE = [
    # n, heartbeat ms, misses, engine misses, registration s, engine timeout s, start timeout s
    (2, 100, 50, 300, 30.0, 10.0, 60.2),
    (8, 100, 50, 300, 30.0, 10.0, 61.0),
    (32, 320, 16, 94, 30.0, 10.0, 63.8),
    (1000, 10_000, 10, 50, 50.0, 50.0, 180.0),
    (12288, 30_000, 10, 50, 614.4, 614.4, 1534.6),
]


@pytest.mark.parametrize(("n", "hb", "miss", "emiss", "reg", "eng", "start"), AUTO_TABLE)
def test_auto_values(n, hb, miss, emiss, reg, eng, start) -> None:
    assert auto_values(n) == {"heartbeat_period_ms": hb, "heartbeat_misses": miss,
                              "engine_heartbeat_misses": emiss, "registration_timeout_s": reg,
                              "engine_timeout_s": eng, "start_timeout_s": start}
    # loss is declared after at least 5 s, whatever the period
    assert hb * miss >= 5_000


def test_auto_values_grow_and_cap() -> None:
    counts = [1, 2, 8, 32, 100, 1000, 3000, 12288, 100_000]
    rows = [auto_values(n) for n in counts]
    for key in ("heartbeat_period_ms", "registration_timeout_s", "engine_timeout_s", "start_timeout_s"):
        seq = [r[key] for r in rows]
        assert seq == sorted(seq), key
        assert seq[-1] > seq[0], key
    assert max(r["heartbeat_period_ms"] for r in rows) == 30_000
    assert auto_values(0) == auto_values(1)
    # registration always outlasts several heartbeats (registration completes on a beat)
    for r in rows:
        assert r["registration_timeout_s"] * 1000 >= 5 * r["heartbeat_period_ms"]


@pytest.mark.parametrize(("n", "hb", "miss", "emiss", "reg", "eng", "start"), AUTO_TABLE)
def test_concretize_dynamic(n, hb, miss, emiss, reg, eng, start) -> None:
    r = resolve("dynamic", {}, {})
    c = concretize(r, n)
    p = c.preset
    assert (p.heartbeat_period_ms, p.registration_timeout_s, p.engine_timeout_s, p.start_timeout_s) == (
        hb, reg, eng, start)
    assert (p.heartbeat_misses, p.engine_heartbeat_misses) == (miss, emiss)
    assert c.sources["heartbeat_period_ms"] == f"auto ({n} engines)"
    assert c.sources["start_timeout_s"] == f"auto ({n} engines)"
    # addresses and per-node counts depend on the allocation: they stay auto
    assert (p.controller_ip, p.controller_location, p.engines_per_node) == ("auto", "auto", "auto")
    assert "controller_ip" not in c.sources
    # the input is not modified
    assert r.preset.heartbeat_period_ms == "auto"
    assert c.name == "dynamic"


def test_concretize_keeps_explicit_values() -> None:
    r = resolve("dynamic", {"heartbeat_period_ms": 1234}, {"IPMTC_START_TIMEOUT_S": "99"})
    c = concretize(r, 12288)
    assert (c.preset.heartbeat_period_ms, c.sources["heartbeat_period_ms"]) == (
        1234, "flag --heartbeat-period-ms")
    assert (c.preset.start_timeout_s, c.sources["start_timeout_s"]) == (99.0, "env IPMTC_START_TIMEOUT_S")
    assert c.preset.registration_timeout_s == 614.4
    # large: fixed heartbeat and registration stay, the rest follows the count
    c = concretize(resolve("large", {}, {}), 12288)
    assert (c.preset.heartbeat_period_ms, c.preset.registration_timeout_s) == (30000, 600.0)
    assert (c.preset.engine_heartbeat_misses, c.sources["engine_heartbeat_misses"]) == (
        50, "auto (12288 engines)")
    assert c.preset.start_timeout_s == 1534.6


# --------------------------------------------------------------------------- errors


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(PresetError) as e:
        resolve("nope", {}, {})
    msg = _one_line(e)
    assert "unknown preset 'nope'" in msg
    assert "debug, dynamic, large, static" in msg


def test_unknown_extends(tmp_path) -> None:
    with pytest.raises(PresetError) as e:
        resolve(str(_file(tmp_path, "extends: huge\n")), {}, {})
    assert "unknown preset 'huge'" in _one_line(e)


def test_missing_preset_file(tmp_path) -> None:
    with pytest.raises(PresetError) as e:
        resolve(str(tmp_path / "absent.yaml"), {}, {})
    msg = _one_line(e)
    assert str(tmp_path / "absent.yaml") in msg and "not found" in msg
    assert "dynamic" in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path) -> None:
    path = _file(tmp_path, "hwm: 1\nscheme: [leastload\ntask_db: dict\n")
    with pytest.raises(PresetError) as e:
        resolve(str(path), {}, {})
    msg = _one_line(e)
    assert msg.startswith(f"{path}:3: YAML syntax error")


def test_yaml_not_a_mapping(tmp_path) -> None:
    path = _file(tmp_path, "- hwm\n- 1\n")
    with pytest.raises(PresetError) as e:
        resolve(str(path), {}, {})
    assert "must be a mapping" in _one_line(e) and "list" in str(e.value)


@pytest.mark.parametrize("origin", ["file", "flag"])
def test_unknown_key_lists_valid_keys(tmp_path, origin) -> None:
    preset, flags = "dynamic", {}
    if origin == "file":
        preset = str(_file(tmp_path, "bogus: 1\n"))
    else:
        flags = {"bogus": "1"}
    with pytest.raises(PresetError) as e:
        resolve(preset, flags, {})
    msg = _one_line(e)
    assert "unknown key 'bogus'" in msg
    listed = msg.split("valid keys: ")[1].split(", ")
    assert [k for k in listed if k != "description"] == [k for k in FIELDS if k != "description"]
    if origin == "file":
        assert listed == list(FIELDS)
    assert msg.startswith("flag --bogus:" if origin == "flag" else f"file {preset}:")


def test_unrelated_ipmtc_env_vars_are_ignored() -> None:
    env = {"IPMTC_BOGUS": "1", "IPMTC_PROFILE": "x", "IPMTC_ALLOCATION": "local"}
    assert resolve("dynamic", {}, env) == resolve("dynamic", {}, {})


def test_description_is_not_a_flag_and_the_message_says_so() -> None:
    # BUG: `--set description=x` is rejected as an "unknown key", and the list of
    # valid keys it prints contains 'description' itself.
    with pytest.raises(PresetError) as e:
        resolve("dynamic", {"description": "x"}, {})
    msg = _one_line(e)
    assert "description" not in msg.split("valid keys:")[-1]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hwm", "-1", "flag --hwm: hwm must be >= 0, got '-1'"),
        ("hwm", -1, "flag --hwm: hwm must be >= 0, got -1"),
        ("heartbeat_period_ms", "0", "flag --heartbeat-period-ms: heartbeat_period_ms must be > 0, got '0'"),
        ("heartbeat_period_ms", -5, "heartbeat_period_ms must be > 0, got -5"),
        ("heartbeat_misses", 0, "heartbeat_misses must be > 0"),
        ("registration_timeout_s", "0", "registration_timeout_s must be > 0"),
        ("start_timeout_s", "nan", "start_timeout_s must be > 0, got 'nan'"),
        ("engines_per_node", 0, "engines_per_node must be > 0"),
        ("scheme", "fastest", "flag --scheme: scheme must be one of leastload, lru, twobin, weighted, "
                              "plainrandom, got 'fastest'"),
        ("scheme", "pure", "scheme must be one of"),
        ("task_db", "mongodb", "task_db must be one of none, dict, sqlite, got 'mongodb'"),
        ("launcher", "ssh", "launcher must be one of auto, srun, mpiexec, local, got 'ssh'"),
        ("log_level", "loud", "log_level must be one of DEBUG, INFO, WARN, ERROR, CRITICAL, got 'LOUD'"),
        ("scheme", "auto", "flag --scheme: scheme cannot be 'auto'; give a value"),
        ("hwm", "auto", "flag --hwm: hwm cannot be 'auto'; give a value"),
        ("task_db", "auto", "task_db cannot be 'auto'"),
        ("log_level", "Auto", "log_level cannot be 'auto'"),
        ("hwm", "many", "flag --hwm: hwm must be a"),
        ("hwm", "1.5", "hwm must be a"),
        ("hwm", True, "hwm must be a"),
        ("mpi_args", 5, "mpi_args must be a list of strings, got 5"),
    ],
)
def test_bad_values(key, value, message) -> None:
    with pytest.raises(PresetError) as e:
        resolve("dynamic", {key: value}, {})
    assert message in _one_line(e)


def test_bad_values_from_env_and_file_name_their_origin(tmp_path) -> None:
    with pytest.raises(PresetError) as e:
        resolve("dynamic", {}, {"IPMTC_HWM": "-1"})
    assert _one_line(e) == "env IPMTC_HWM: hwm must be >= 0, got '-1'"
    path = _file(tmp_path, "heartbeat_period_ms: 0\n")
    with pytest.raises(PresetError) as e:
        resolve(str(path), {}, {})
    assert _one_line(e) == f"file {path}: heartbeat_period_ms must be > 0, got 0"
    path = _file(tmp_path, "hwm: yes\n", "bool.yaml")
    with pytest.raises(PresetError) as e:
        resolve(str(path), {}, {})
    assert f"file {path}: hwm must be a" in _one_line(e)


@pytest.mark.parametrize("key", ["heartbeat_period_ms", "registration_timeout_s"])
def test_wrong_type_message_names_a_number_type(key) -> None:
    # BUG: for keys whose default is 'auto' the type in the message comes from the
    # default ('auto' is a str): "heartbeat_period_ms must be a str or 'auto'".
    with pytest.raises(PresetError) as e:
        resolve("dynamic", {key: "fast"}, {})
    msg = _one_line(e)
    assert "must be a str" not in msg
    assert "or 'auto'" in msg
    assert ("int" in msg) or ("number" in msg) or ("float" in msg)


@pytest.mark.parametrize(("key", "value"), [("hwm", "inf"), ("engines_per_node", "1e400")])
def test_infinite_integer_is_a_preset_error(key, value) -> None:
    # BUG: int(float('inf')) raises OverflowError, which coerce() does not catch,
    # so `ipmtc start --set hwm=inf` ends in a traceback.
    with pytest.raises(PresetError) as e:
        resolve("dynamic", {key: value}, {})
    assert key in _one_line(e)


def test_empty_value_in_file_is_not_the_string_none(tmp_path) -> None:
    # BUG: `controller_ports:` (YAML null) became the string 'None', later written
    # as c.IPController.ports = 'None' (the controller fails to parse it).
    path = _file(tmp_path, "controller_ports:\ncontroller_ip:\n")
    try:
        r = resolve(str(path), {}, {})
    except PresetError as e:
        assert "controller_" in str(e) and "\n" not in str(e)
    else:
        assert r.preset.controller_ports != "None"
        assert r.preset.controller_ip != "None"


# --------------------------------------------------------------------------- values and YAML


def test_numeric_conversions() -> None:
    p = resolve("dynamic", {"hwm": "0", "heartbeat_period_ms": "1e3", "engine_timeout_s": "2",
                            "mpi_args": ["-x", 3]}, {}).preset
    assert p.hwm == 0 and isinstance(p.hwm, int)
    assert p.heartbeat_period_ms == 1000 and isinstance(p.heartbeat_period_ms, int)
    assert p.engine_timeout_s == 2.0 and isinstance(p.engine_timeout_s, float)
    assert p.mpi_args == ("-x", "3")


def _expected_mapping(r) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v, _ in r.rows()}


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("engines", [None, 2, 12288])
def test_to_yaml_round_trip(name, engines) -> None:
    r = resolve(name, {}, {})
    if engines:
        r = concretize(r, engines)
    text = to_yaml(r)
    assert yaml.safe_load(text) == _expected_mapping(r)
    lines = text.splitlines()
    assert lines[0].startswith(f"# resolved ipmtc preset '{name}'")
    assert len(lines) == 1 + len(FIELDS)
    for (key, _, src), line in zip(r.rows(), lines[1:]):
        assert line.startswith(f"{key}: ")
        assert line.endswith(f"  # {src}")


def test_to_yaml_round_trip_awkward_values(tmp_path) -> None:
    path = _file(tmp_path, 'description: "a: b # c, {d} \'e\'"\nmpi_args: ["--x=1", "two words", "#"]\n'
                           "controller_ports: 10101-10120\ncontroller_location: 'host:1'\n")
    r = resolve(str(path), {"hwm": 0}, {"IPMTC_ENGINE_TIMEOUT_S": "7.25"})
    data = yaml.safe_load(to_yaml(r))
    assert data == _expected_mapping(r)
    assert data["description"] == "a: b # c, {d} 'e'"
    assert data["mpi_args"] == ["--x=1", "two words", "#"]
    assert data["engine_timeout_s"] == 7.25


def test_preset_dataclass_defaults_match_documentation() -> None:
    p = Preset()
    assert dataclasses.asdict(p)["scheme"] == "leastload"
    assert p.hwm == 1 and p.task_db == "dict" and p.launcher == "auto"
    assert set(P.AUTO_OK) <= set(FIELDS)
    assert set(P.MINIMUM) <= set(FIELDS)
