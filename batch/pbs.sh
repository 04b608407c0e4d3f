#!/bin/bash
# pbs.sh - run a many-task Python script on an ipmtc cluster spanning every node of a PBS/Torque job.
#
#   qsub batch/pbs.sh                                   # the #PBS lines below decide the size
#   qsub -l nodes=8:ppn=32,walltime=04:00:00 batch/pbs.sh
#   qsub -v MTC_ARGS="--tasks 100000" batch/pbs.sh      # arguments for the script (qsub has no args)
#
# What it does:
#   1. `ipmtc start` sees PBS_JOBID and reads $PBS_NODEFILE (one line per core slot). It starts the
#      controller here and one engine per slot with `mpiexec -machinefile` (MPICH's hydra: the
#      mpich wheel of `pip install 'ipmtc[mpi]'`, or a site MPICH), -ppn slots per node.
#   2. Your Python script ($MTC_SCRIPT) calls ipmtc.connect() and maps its tasks (dynamic_map).
#   3. `ipmtc stop` stops everything, from a trap: also when the script fails or the job is killed
#      with SIGTERM (qdel, or the walltime: PBS sends SIGTERM, then SIGKILL after its kill delay).
#
# Walltime: dynamic_map reads the job's end time (qstat -f: Resource_List.walltime and the start
# time; without qstat on the node, Torque's PBS_WALLTIME) and stops handing out tasks that would
# not finish --drain-margin-s before it. Keep the margin above the time `ipmtc stop` needs.
#
# Across nodes hydra starts its proxies with ssh (or PBS's TM interface where MPICH was built with
# it): passwordless ssh between the job's nodes must work, as for any MPI job. The engines must
# reach the controller on this node over TCP (ipmtc picks this node's address).
#
# Exit status: the script's (example_mtc.py: 0 all done, 1 failures, 3 drained with undone tasks),
# 143 when SIGTERM (walltime, qdel) ended it early, or 1 when the cluster could not start.
#
# Copy this file next to your script and edit the lines marked "EDIT".

# shellcheck disable=SC2317  # (stop_all and on_signal run from traps)
#PBS -N ipmtc
#PBS -l nodes=4:ppn=4
#PBS -l walltime=00:30:00
#PBS -j oe
# EDIT: nodes and engines per node above. PBS Pro writes the size as
#   #PBS -l select=4:ncpus=4:mpiprocs=4
# (mpiprocs = lines per node in $PBS_NODEFILE = engines per node).

set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"   # PBS starts jobs in $HOME: go where qsub was run

# EDIT: load your environment so that `ipmtc` and your Python are on PATH, e.g.
#   module load python/3.11 ; source ~/venvs/mtc/bin/activate
PYTHON=${PYTHON:-python3}
MTC_SCRIPT=${MTC_SCRIPT:-batch/example_mtc.py}   # EDIT: your script (relative to where you ran qsub)
read -r -a MTC_ARGV <<< "${MTC_ARGS:-}"           # EDIT: or write the script's arguments here

export IPMTC_PROFILE=${IPMTC_PROFILE:-ipmtc-${PBS_JOBID%%.*}}   # one cluster per job

log() { echo "[$(date '+%F %T')] $*"; }
command -v ipmtc >/dev/null || { log "error: ipmtc is not on PATH (activate your environment above)"; exit 1; }

started=0
child=""
stop_all() {  # EXIT trap: runs once, however the script ends
  local rc=$?
  trap - EXIT TERM INT
  set +e
  if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
    log "interrupting $MTC_SCRIPT (SIGINT, as Ctrl-C: it keeps what finished)"
    kill -INT "$child" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$child" 2>/dev/null || break; sleep 1; done
    kill -KILL "$child" 2>/dev/null
    wait "$child" 2>/dev/null
  fi
  if [ "$started" = 1 ]; then
    log "stopping the cluster"
    ipmtc stop --profile "$IPMTC_PROFILE"
  else
    ipmtc stop --force --profile "$IPMTC_PROFILE" >/dev/null 2>&1
  fi
  log "done (exit status $rc)"
  exit "$rc"
}
on_signal() { log "received SIG$1 (walltime reached or job deleted)"; exit 143; }
trap stop_all EXIT
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

log "PBS job $PBS_JOBID: $(sort -u "$PBS_NODEFILE" | wc -l) nodes, $(wc -l < "$PBS_NODEFILE") slots ($PBS_NODEFILE)"
ipmtc start                       # all nodes of $PBS_NODEFILE; e.g. --engines-per-node 8 for fewer
started=1
log "cluster ready (epoch $(date +%s.%N))"
ipmtc status

# In the background so that the trap runs at once on SIGTERM; `trap - INT` gives it Ctrl-C back.
( trap - INT; exec "$PYTHON" "$MTC_SCRIPT" ${MTC_ARGV[@]+"${MTC_ARGV[@]}"} ) &
child=$!
rc=0
wait "$child" || rc=$?
child=""
log "$MTC_SCRIPT exited with status $rc"
exit "$rc"
