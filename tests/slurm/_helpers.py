"""Shared checks for the batch-script tests (Slurm and PBS)."""
from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

from ipmtc.errors import JournalError
from ipmtc.journal import Journal

REPO = Path(__file__).resolve().parents[2]
BATCH = REPO / "batch"


@lru_cache(maxsize=1)
def example_module():
    spec = importlib.util.spec_from_file_location("example_mtc", BATCH / "example_mtc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_results(res_file: Path, n_tasks: int, samples: int) -> dict:
    """The JSON that example_mtc.py wrote: every finished task's value is what the task computes."""
    data = json.loads(res_file.read_text())
    throw_darts = example_module().throw_darts
    done = {index: (inside, node) for index, inside, node in data["results"]}
    assert len(done) == len(data["results"]), "a task's result appears twice"
    assert set(done) | set(data["undone"]) | set(data["failed"]) == set(range(n_tasks))
    assert not set(done) & set(data["undone"])
    for index, (inside, _) in done.items():
        assert inside == throw_darts((index, samples, 0))[1], f"task {index}: wrong result {inside}"
    return data


def engines_per_node(output: str) -> dict[str, int]:
    """The ``    n1: 4`` lines that ``ipmtc status`` prints."""
    block = output.split("engines:", 1)[1].split("tasks:", 1)[0] if "engines:" in output else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(\S+): (\d+)$", block, re.M)}


def ready_epoch(output: str) -> float:
    m = re.search(r"cluster ready \(epoch ([\d.]+)\)", output)
    assert m, f"no 'cluster ready' line in the job output:\n{output}"
    return float(m.group(1))


def journal_rows(path: Path) -> list[dict]:
    """Every task a job's journal records so far (read-only; none while the journal is not there yet)."""
    try:
        r = Journal.open(path, readonly=True)
    except JournalError as e:  # not there yet, or being created this very moment
        if "does not exist" in str(e) or "holds nothing yet" in str(e):
            return []
        raise
    try:
        return list(r.rows())
    finally:
        r.close()
