#!/usr/bin/env bash
# The README's second command: install what the tests need, then run them all.
# CI calls exactly this (.ci/run). Real components only: the tests start real
# ipcontroller/engines, mpiexec from the mpich wheel, Jupyter kernels, and a
# real local Slurm (munge + slurmctld + 4 slurmd from Debian's packages,
# installed and started by tests/slurm/harness as root, stopped at the end).
# ruff and mypy (configured in pyproject.toml) check ipmtc/ before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# lint and type checks first: a few seconds, and they fail fast
.venv/bin/ruff check ipmtc
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
