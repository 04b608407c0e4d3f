#!/usr/bin/env bash
# selftest.sh - check the harness end to end on this machine (root):
#   start -> 4-node job (each of n1..n4 runs 2 tasks) -> stop -> none of the
#   daemons it started is left -> start + stop again (idempotence) -> purge.
# Uses its own IPMTC_SLURM_BASE (default ${TMPDIR:-/tmp}/ipmtc-slurm-selftest).
# Prints the timings from start-slurm.sh and the stop durations.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export IPMTC_SLURM_BASE=${IPMTC_SLURM_BASE:-${TMPDIR:-/tmp}/ipmtc-slurm-selftest}
export IPMTC_SLURM_NODES=4
BASE=$IPMTC_SLURM_BASE
fail() { echo "selftest FAILED: $*" >&2; exit 1; }
now_us() { echo "${EPOCHREALTIME/./}"; }
secs() { printf '%d.%02d' $(($1 / 1000000)) $(($1 % 1000000 / 10000)); }

# our daemons' pids, from the pid files
our_pids() { cat "$BASE"/run/*.pid "$BASE"/munge-priv/munged.pid 2>/dev/null | tr '\n' ' '; }
# fail if any of the given pids still runs (zombies count as dead)
check_gone() {
  local p st
  for p in "$@"; do
    st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || echo gone)
    case $st in Z|gone) ;; *) fail "pid $p ($(cat "/proc/$p/comm" 2>/dev/null)) still running" ;; esac
  done
}
timed_stop() {
  local t0; t0=$(now_us)
  "$HERE/stop-slurm.sh"
  echo "selftest: stop $(secs $(( $(now_us) - t0 )))s"
}

"$HERE/stop-slurm.sh" --purge 2>/dev/null   # clean slate

for round in 1 2; do
  "$HERE/start-slurm.sh"
  pids=$(our_pids)
  [ -n "$pids" ] || fail "no pid files"
  out=$(mktemp)
  t0=$(now_us)
  (
    # shellcheck disable=SC1091
    source "$BASE/env.sh"
    cd /tmp
    # shellcheck disable=SC2016  # $SLURMD_NODENAME expands in the tasks
    sbatch --wait -N 4 --ntasks-per-node=2 -o "$out" --wrap 'srun bash -c "echo \$SLURMD_NODENAME"' >/dev/null
  ) || fail "job failed: $(cat "$out")"
  t_job=$(( $(now_us) - t0 ))
  got=$(sort "$out" | uniq -c | awk '{print $2 "x" $1}' | tr '\n' ' ')
  rm -f "$out"
  [ "$got" = "n1x2 n2x2 n3x2 n4x2 " ] || fail "unexpected job output: $got"
  echo "selftest: round $round job ran on $got(sbatch --wait took $(secs "$t_job")s)"
  timed_stop
  # shellcheck disable=SC2086
  check_gone $pids
  "$HERE/stop-slurm.sh" 2>/dev/null          # a second stop is a no-op
done
"$HERE/stop-slurm.sh" --purge
[ ! -e "$BASE" ] || fail "$BASE still exists after --purge"
echo "selftest: OK"
