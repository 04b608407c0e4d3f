#!/usr/bin/env bash
# stop-slurm.sh - stop exactly the daemons that start-slurm.sh started from
# $IPMTC_SLURM_BASE, found through their pid files under that dir. Never
# matches processes by name: each pid is checked against /proc/PID/comm (and
# its command line against $IPMTC_SLURM_BASE) before it is signalled.
#
#   1. cancel the cluster's jobs while slurmctld is up, wait for their
#      slurmstepd to go
#   2. stop the slurmd(s), then slurmctld, then munged - munged only if this
#      harness started it (munge-priv/munged.pid exists); a munged that was
#      already answering on the default socket is left alone
#   3. report (never kill) slurmstepd of our jobs that outlived the wait
#
# Options:
#   --keep-munge   leave munged running (used by start-slurm.sh on restart)
#   --purge        also delete $IPMTC_SLURM_BASE (config, state, logs, key);
#                  only a dir marked by start-slurm.sh (.ipmtc-slurm) is deleted
# Idempotent: running it again, or on a base that never started, is a no-op.
# Env: IPMTC_SLURM_BASE (default ${TMPDIR:-/tmp}/ipmtc-slurm)
#      IPMTC_SLURM_STOP_WAIT  seconds to wait after SIGTERM before SIGKILL (default 30)
set -euo pipefail

BASE=${IPMTC_SLURM_BASE:-${TMPDIR:-/tmp}/ipmtc-slurm}
TERM_WAIT=${IPMTC_SLURM_STOP_WAIT:-30}
KEEP_MUNGE=0; PURGE=0
for a in "$@"; do
  case $a in
    --keep-munge) KEEP_MUNGE=1 ;;
    --purge) PURGE=1 ;;
    *) echo "usage: $0 [--keep-munge] [--purge]" >&2; exit 2 ;;
  esac
done
log() { printf '[ipmtc-slurm stop] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "ERROR: must run as root"; exit 1; }
if [ ! -d "$BASE" ]; then
  log "nothing to stop: $BASE does not exist"
  exit 0
fi
BASE=$(cd "$BASE" && pwd)
export SLURM_CONF=$BASE/etc/slurm.conf

# pid from a pid file if that process is alive (zombies count as dead)
alive_pid() {
  local f=$1 p st
  [ -s "$f" ] || return 1
  p=$(cat "$f" 2>/dev/null) || return 1
  case $p in ''|*[!0-9]*) return 1 ;; esac
  st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] || return 1
  echo "$p"
}

# is_ours PID COMM: PID is that daemon and was started with a path under $BASE
# (a pid file can outlive its process and the pid be reused)
is_ours() {
  local p=$1 want=$2 comm cmd
  comm=$(cat "/proc/$p/comm" 2>/dev/null) || return 1
  [ "$comm" = "$want" ] || return 1
  cmd=$(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline") || return 1
  case $cmd in *"$BASE/"*) return 0 ;; *) return 1 ;; esac
}

# stop_pidfile FILE COMM: TERM, wait up to TERM_WAIT s, then KILL
stop_pidfile() {
  local f=$1 want=$2 p st=run i
  p=$(alive_pid "$f") || { rm -f "$f"; return 0; }
  if ! is_ours "$p" "$want"; then
    log "pid $p in $f is not our $want ($(cat "/proc/$p/comm" 2>/dev/null || echo '?')): not touching it"
    rm -f "$f"
    return 0
  fi
  log "stopping $want (pid $p)"
  kill -TERM "$p" 2>/dev/null || true
  for ((i = 0; i < TERM_WAIT * 20; i++)); do
    st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || echo gone)
    case $st in Z|gone) break ;; esac
    sleep 0.05
  done
  if [ "$st" != Z ] && [ "$st" != gone ] && is_ours "$p" "$want"; then
    log "$want (pid $p) ignored SIGTERM for ${TERM_WAIT}s: SIGKILL"
    kill -KILL "$p" 2>/dev/null || true
  fi
  rm -f "$f"
}

# slurmstepd pids (cmdline "slurmstepd: [JOBID.STEP]") of the given job ids
stepd_pids() {
  local d c j
  for d in /proc/[0-9]*; do
    c=$(tr '\0' ' ' 2>/dev/null < "$d/cmdline") || continue
    case $c in "slurmstepd: ["*) ;; *) continue ;; esac
    for j in "$@"; do
      case $c in "slurmstepd: [$j."*) echo "${d#/proc/}"; break ;; esac
    done
  done
  return 0
}

# ---------------------------------------------------------------- 1. jobs
known_jobs=()
if alive_pid "$BASE/run/slurmctld.pid" >/dev/null && [ -f "$SLURM_CONF" ]; then
  read -r -a known_jobs <<< "$(squeue -h -t all -o %A 2>/dev/null | tr '\n' ' ' || true)"
  active=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
  if [ -n "${active// /}" ]; then
    log "cancelling jobs: $active"
    # shellcheck disable=SC2086
    scancel $active 2>/dev/null || true
    for _ in $(seq 1 150); do
      [ -z "$(squeue -h -t R,CG,PD,S -o %i 2>/dev/null || true)" ] && break
      sleep 0.2
    done
  fi
  if [ ${#known_jobs[@]} -gt 0 ]; then
    for _ in $(seq 1 100); do
      [ -z "$(stepd_pids "${known_jobs[@]}")" ] && break
      sleep 0.1
    done
  fi
fi

# ---------------------------------------------------------------- 2. daemons
for f in "$BASE"/run/slurmd-*.pid; do
  [ -e "$f" ] || continue
  stop_pidfile "$f" slurmd
done
stop_pidfile "$BASE/run/slurmctld.pid" slurmctld
REGISTRY=/run/ipmtc-slurm.d
ENTRY=$REGISTRY/$(printf '%s' "$BASE" | md5sum | cut -c1-16)
if [ "$KEEP_MUNGE" = 0 ]; then
  # munged is shared through the default socket: other clusters started by
  # this harness may use the one we started. Stop it anyway (we stop what we
  # started) but say who loses it.
  if alive_pid "$BASE/munge-priv/munged.pid" >/dev/null; then
    for e in "$REGISTRY"/*; do
      if [ ! -f "$e" ] || [ "$e" = "$ENTRY" ]; then continue; fi
      other=$(cat "$e" 2>/dev/null || true)
      if [ -n "$other" ] && alive_pid "$other/run/slurmctld.pid" >/dev/null; then
        log "warning: cluster in $other still uses the munged being stopped"
      fi
    done
  fi
  stop_pidfile "$BASE/munge-priv/munged.pid" munged
  rm -f "$ENTRY"
fi

# ---------------------------------------------------------------- 3. report
if [ ${#known_jobs[@]} -gt 0 ]; then
  left=$(stepd_pids "${known_jobs[@]}" | tr '\n' ' ')
  if [ -n "${left// /}" ]; then log "warning: slurmstepd still running: $left"; fi
fi

if [ "$PURGE" = 1 ]; then
  if [ -e "$BASE/.ipmtc-slurm" ] && [ "$BASE" != / ]; then
    rm -rf "$BASE"
    log "purged $BASE"
  else
    log "not purging $BASE: no .ipmtc-slurm marker (not made by start-slurm.sh)"
  fi
fi
log "stopped"
