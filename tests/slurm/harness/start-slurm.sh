#!/usr/bin/env bash
# start-slurm.sh - install (if needed), configure and start a private local
# Slurm cluster for ipmtc's tests: munged + slurmctld + N slurmd, all on this
# host, as root, without systemd or cgroups. The N slurmd are fake nodes
# n1..nN (NodeAddr=127.0.0.1, one port each), so multi-node jobs
# (`sbatch -N 4 ...`) behave as on a real cluster.
#
# Adapted from /work/shared/reference/local-slurm/start-local-slurm.sh,
# trimmed to what ipmtc needs (no MariaDB/slurmdbd/sacct, no pmix).
#
# Everything the daemons write (config, state, logs, pid files, spool, munge
# key) lives under $IPMTC_SLURM_BASE. Outside it: the Debian packages that
# apt-get installs, munged's socket at the default /run/munge/munge.socket.2
# (Slurm's clients talk to the default socket; a private one breaks them in
# places), the lock file /run/ipmtc-slurm.lock and one small file per base
# in /run/ipmtc-slurm.d/ (which clusters share munged).
#
# Knobs (environment variables):
#   IPMTC_SLURM_BASE        state dir                (default ${TMPDIR:-/tmp}/ipmtc-slurm)
#   IPMTC_SLURM_NODES       number of fake nodes     (default 4 -> n1..n4)
#   IPMTC_SLURM_CPUS        CPUs declared per node   (default 4; more than the
#                           real cores is fine: SlurmdParameters=config_overrides)
#   IPMTC_SLURM_MEM_MB      RealMemory per node, MB  (default 2000)
#   IPMTC_SLURM_CTLD_PORT   slurmctld port           (default: a free port picked
#                           at random below the ephemeral range; the slurmd
#                           ports are then the next N ports)
#   IPMTC_SLURM_SLURMD_PORT first slurmd port        (only with IPMTC_SLURM_CTLD_PORT;
#                           default CTLD_PORT+1; node i gets +i-1)
#   IPMTC_SLURM_TIMEOUT     seconds to wait for each daemon and for idle nodes
#                           (default 60)
#   IPMTC_SLURM_MIN_JOB_AGE seconds a finished job stays visible to squeue/scontrol
#                           (default 300). sbatch --wait polls after 2 s, then
#                           sleeps x4 while below MinJobAge/2 (at most 32 s):
#                           16 keeps its polls 8 s apart instead of 32 s
#   IPMTC_SLURM_GPUS        fake GPUs per node       (default 0 = no gres). >0:
#                           GresTypes=gpu, Gres=gpu:N per node, gres.conf with
#                           File=$BASE/dev/nvidia[0-N-1] (char devices made with
#                           mknod c 1 3; Slurm 22.05 drops file-less GPUs, so a
#                           Count-only gres.conf leaves the nodes INVAL)
#   IPMTC_SLURM_WAIT_SCHED  1 (default): also wait for slurmctld's first
#                           scheduling pass (~3 s after it starts), so that
#                           the first job starts as fast as later ones; 0: don't
#
# Idempotent: run it again with the same knobs and it keeps the running
# daemons (and their ports); with other knobs it restarts the Slurm daemons.
#
# Output: log lines on stderr; exactly one line on stdout with the timings,
#   ipmtc-slurm: install <s>s start <s>s (nodes idle after <s>s) nodes=<N> SLURM_CONF=<path>
# (also written to $IPMTC_SLURM_BASE/timings.env).
# After it returns 0:   source "$IPMTC_SLURM_BASE/env.sh"   (exports SLURM_CONF)
# Stop with stop-slurm.sh (same IPMTC_SLURM_BASE).
set -euo pipefail
umask 022

BASE=${IPMTC_SLURM_BASE:-${TMPDIR:-/tmp}/ipmtc-slurm}
NODES=${IPMTC_SLURM_NODES:-4}
CPUS=${IPMTC_SLURM_CPUS:-4}
MEM=${IPMTC_SLURM_MEM_MB:-2000}
TIMEOUT=${IPMTC_SLURM_TIMEOUT:-60}
WAIT_SCHED=${IPMTC_SLURM_WAIT_SCHED:-1}
MIN_JOB_AGE=${IPMTC_SLURM_MIN_JOB_AGE:-300}
GPUS=${IPMTC_SLURM_GPUS:-0}
HOST=$(hostname -s 2>/dev/null || hostname)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MSOCK=/run/munge/munge.socket.2      # munged's default socket (see header)
LOCK=/run/ipmtc-slurm.lock           # serialises concurrent starts on this host
REGISTRY=/run/ipmtc-slurm.d          # one file per started base (munged users)

log() { printf '[ipmtc-slurm start] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now_us() { echo "${EPOCHREALTIME/./}"; }            # bash 5: microseconds
secs() { printf '%d.%02d' $(($1 / 1000000)) $(($1 % 1000000 / 10000)); }

[ "$(id -u)" = 0 ] || die "must run as root"
case $NODES in ''|*[!0-9]*|0) die "IPMTC_SLURM_NODES must be a positive integer" ;; esac
case $CPUS in ''|*[!0-9]*|0) die "IPMTC_SLURM_CPUS must be a positive integer" ;; esac
case $GPUS in ''|*[!0-9]*) die "IPMTC_SLURM_GPUS must be a non-negative integer" ;; esac
case $MIN_JOB_AGE in ''|*[!0-9]*|0) die "IPMTC_SLURM_MIN_JOB_AGE must be a positive integer" ;; esac
BASE=$(mkdir -p "$BASE" && cd "$BASE" && pwd)       # absolute: it goes into slurm.conf
[ "$BASE" != / ] || die "IPMTC_SLURM_BASE must not be /"

# One start at a time on this host: the port choice below is only race-free
# if nobody else picks ports between our check and our daemons binding them.
# The daemons are started with fd 9 closed so they do not keep the lock.
exec 9>"$LOCK"
flock -w 300 9 || die "could not get $LOCK within 300s"

# ---------------------------------------------------------------- layout
# .ipmtc-slurm marks the dir as ours: stop-slurm.sh --purge only deletes a
# dir that carries it.
mkdir -p "$BASE"/{etc,state,log,run,spool,tmp,munge-priv}
touch "$BASE/.ipmtc-slurm"
chmod 700 "$BASE/munge-priv"        # munged insists on a private key dir
CONF=$BASE/etc/slurm.conf

# ---------------------------------------------------------------- install
t_install0=$(now_us)
pkgs=()
command -v munged    >/dev/null 2>&1 || pkgs+=(munge)
command -v slurmctld >/dev/null 2>&1 || pkgs+=(slurmctld)
command -v slurmd    >/dev/null 2>&1 || pkgs+=(slurmd)
command -v sbatch    >/dev/null 2>&1 || pkgs+=(slurm-client)
if [ ${#pkgs[@]} -gt 0 ]; then
  log "installing: ${pkgs[*]} (log: $BASE/log/apt.log)"
  # Keep the packages' init scripts from starting daemons with Debian's
  # default config: invoke-rc.d asks /usr/sbin/policy-rc.d, exit 101 = deny.
  # Create it only if absent, and remove only what we created.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  {
    apt-get -o DPkg::Lock::Timeout=300 update -qq &&
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${pkgs[@]}"
  } >"$BASE/log/apt.log" 2>&1 9>&- || die "apt-get failed: $(tail -5 "$BASE/log/apt.log")"
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi
t_install=$(( $(now_us) - t_install0 ))
t_start0=$(now_us)

# ---------------------------------------------------------------- helpers
# alive_pid FILE COMM: pid from a pid file if that process is alive and is
# COMM (zombies count as dead: they are reaped late on these machines; a
# stale pid file whose pid now belongs to another program counts as dead)
alive_pid() {
  local f=$1 want=$2 p st
  [ -s "$f" ] || return 1
  p=$(cat "$f" 2>/dev/null) || return 1
  case $p in ''|*[!0-9]*) return 1 ;; esac
  st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] || return 1
  [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$want" ] || return 1
  echo "$p"
}

# any Slurm daemon of this base still alive?
any_slurm_alive() {
  local f
  alive_pid "$BASE/run/slurmctld.pid" slurmctld >/dev/null && return 0
  for f in "$BASE"/run/slurmd-*.pid; do
    alive_pid "$f" slurmd >/dev/null && return 0
  done
  return 1
}

# wait_for SECONDS CMD... : run CMD every 0.1 s until it succeeds
wait_for() {
  local t=$1; shift
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.1
  done
}

# TCP ports in use on this host (any state, IPv4 and IPv6), one per line
used_ports() {
  local h
  awk 'FNR > 1 { split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null |
    while read -r h; do echo $((16#$h)); done
}

# pick_block COUNT: print the first port of COUNT consecutive free ports,
# chosen at random below the kernel's ephemeral range (so that outgoing
# connections of srun & co. never grab them first)
pick_block() {
  local count=$1 lo=20000 hi eph_lo _eph_hi p i ok
  read -r eph_lo _eph_hi < /proc/sys/net/ipv4/ip_local_port_range
  hi=$((eph_lo - 1))
  if [ $((hi - lo)) -lt $((count + 1000)) ]; then lo=10000; hi=19999; fi
  declare -A used=()
  for p in $(used_ports); do used[$p]=1; done
  for _ in $(seq 1 500); do
    p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo - count)))
    ok=1
    for ((i = 0; i < count; i++)); do
      if [ -n "${used[$((p + i))]:-}" ]; then ok=0; break; fi
    done
    if [ $ok = 1 ]; then echo "$p"; return 0; fi
  done
  return 1
}

# ---------------------------------------------------------------- ports
# Explicit ports win. Otherwise keep the ports of daemons of this base that
# are still running (so a second start is a no-op), else pick free ones.
PORTS_FILE=$BASE/etc/ports.env
if [ -n "${IPMTC_SLURM_CTLD_PORT:-}" ]; then
  CTLD_PORT=$IPMTC_SLURM_CTLD_PORT
  SLURMD_PORT=${IPMTC_SLURM_SLURMD_PORT:-$((CTLD_PORT + 1))}
elif [ -s "$PORTS_FILE" ] && any_slurm_alive; then
  # shellcheck disable=SC1090
  . "$PORTS_FILE"
else
  CTLD_PORT=$(pick_block $((NODES + 1))) || die "no block of $((NODES + 1)) free TCP ports found"
  SLURMD_PORT=$((CTLD_PORT + 1))
fi
if ! any_slurm_alive; then
  # nothing of ours runs: every port we are about to use must be free
  declare -A inuse=()
  for p in $(used_ports); do inuse[$p]=1; done
  for p in "$CTLD_PORT" $(seq "$SLURMD_PORT" $((SLURMD_PORT + NODES - 1))); do
    [ -z "${inuse[$p]:-}" ] || die "TCP port $p is already in use"
  done
fi

NODE_NAMES=()
for i in $(seq 1 "$NODES"); do NODE_NAMES+=("n$i"); done

# ---------------------------------------------------------------- config
# fake GPUs: gres.conf sits next to slurm.conf. slurmd only stat()s the
# File= paths (must be char/block devices: plain files are accepted with an
# error and yield no CUDA_VISIBLE_DEVICES). All fake nodes share the same
# files; harmless with task/none (no cgroup device constraint).
GRES_NODE=
GRES_LINE=
if [ "$GPUS" -gt 0 ]; then
  GRES_NODE=" Gres=gpu:${GPUS}"
  mkdir -p "$BASE/dev"
  for g in $(seq 0 $((GPUS - 1))); do
    [ -c "$BASE/dev/nvidia$g" ] || { rm -f "$BASE/dev/nvidia$g"; mknod "$BASE/dev/nvidia$g" c 1 3; }
  done
  GRES_LINE="Name=gpu File=${BASE}/dev/nvidia[0-$((GPUS - 1))]"
fi
if [ "$GRES_LINE" != "$(cat "$BASE/etc/gres.conf" 2>/dev/null)" ]; then
  printf '%s\n' "$GRES_LINE" > "$BASE/etc/gres.conf"
  # slurmd reads gres.conf only at start: force the restart below
  [ ! -f "$CONF" ] || echo "# gres.conf changed" >> "$CONF"
fi
new_conf=$(mktemp "$BASE/etc/slurm.conf.XXXXXX")
{
cat <<EOF
# generated by ipmtc tests/slurm/harness/start-slurm.sh - do not edit
ClusterName=ipmtc
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=${BASE}/state
# one spool dir, pid file, log and TmpFS per fake node (%n = node name):
# several slurmd on one host must not share them
SlurmdSpoolDir=${BASE}/spool/slurmd-%n
SlurmctldPidFile=${BASE}/run/slurmctld.pid
SlurmdPidFile=${BASE}/run/slurmd-%n.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd-%n.log
TmpFS=${BASE}/tmp/%n
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no systemd/cgroups here: track processes by parentage, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=pmi2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# start batch jobs at once (~1 s instead of ~3 s per job)
SchedulerParameters=batch_sched_delay=0
# declared CPUs may exceed the real cores
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=300
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=${MIN_JOB_AGE}
# one task of a step dying must not take the others down (ipmtc's engines):
# no kill on bad exit, no wait-then-kill after the first task ends
KillOnBadExit=0
Waittime=0
EOF
if [ "$GPUS" -gt 0 ]; then echo "GresTypes=gpu"; fi
i=0
for n in "${NODE_NAMES[@]}"; do
  echo "NodeName=${n} NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) CPUs=${CPUS} RealMemory=${MEM}${GRES_NODE} State=UNKNOWN"
  i=$((i + 1))
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$new_conf"
chmod 644 "$new_conf"

if [ -f "$CONF" ] && cmp -s "$new_conf" "$CONF"; then
  rm -f "$new_conf"
else
  if any_slurm_alive; then
    log "config changed: restarting the Slurm daemons"
    IPMTC_SLURM_BASE=$BASE bash "$HERE/stop-slurm.sh" --keep-munge 9>&- >&2 || true
  fi
  mv "$new_conf" "$CONF"
fi
printf 'CTLD_PORT=%s\nSLURMD_PORT=%s\n' "$CTLD_PORT" "$SLURMD_PORT" > "$PORTS_FILE"
export SLURM_CONF=$CONF

# ---------------------------------------------------------------- munged
# Reuse a munged that already answers on the default socket (ours from an
# earlier start, or someone else's); else start one with a key under $BASE.
# stop-slurm.sh stops munged only if munge-priv/munged.pid exists, i.e. if
# this harness started it.
munge_ok() { munge -S "$MSOCK" -n | unmunge -S "$MSOCK"; }
if ! alive_pid "$BASE/munge-priv/munged.pid" munged >/dev/null; then
  rm -f "$BASE/munge-priv/munged.pid"
  if munge_ok >/dev/null 2>&1; then
    log "a munged not started from this base already answers on $MSOCK: using it"
  else
    if [ ! -s "$BASE/munge-priv/munge.key" ]; then
      dd if=/dev/urandom of="$BASE/munge-priv/munge.key" bs=1 count=1024 2>/dev/null
      chmod 400 "$BASE/munge-priv/munge.key"
    fi
    # every directory above the socket must be world-searchable
    mkdir -p /run/munge
    chmod 755 /run/munge
    rm -f "$MSOCK" "$MSOCK.lock"
    log "starting munged"
    /usr/sbin/munged --socket="$MSOCK" \
      --key-file="$BASE/munge-priv/munge.key" \
      --pid-file="$BASE/munge-priv/munged.pid" \
      --log-file="$BASE/log/munged.log" \
      --seed-file="$BASE/munge-priv/munged.seed" </dev/null >/dev/null 2>&1 9>&- \
      || die "munged failed: $(tail -3 "$BASE/log/munged.log" 2>/dev/null)"
  fi
fi
wait_for 10 munge_ok || die "munge round trip on $MSOCK failed"
# Register this base as a user of the shared munged, so that stop-slurm.sh
# can warn when it stops a munged that other clusters still rely on.
mkdir -p "$REGISTRY"
printf '%s\n' "$BASE" > "$REGISTRY/$(printf '%s' "$BASE" | md5sum | cut -c1-16)"

# ---------------------------------------------------------------- slurmctld
if ! alive_pid "$BASE/run/slurmctld.pid" slurmctld >/dev/null; then
  log "starting slurmctld on port $CTLD_PORT"
  # -i: ignore unreadable state files (the first start has none)
  slurmctld -f "$CONF" -i </dev/null >/dev/null 2>&1 9>&- \
    || die "slurmctld failed: $(tail -5 "$BASE/log/slurmctld.log" 2>/dev/null)"
fi
ctld_up() { scontrol ping | grep -q 'is UP'; }
wait_for "$TIMEOUT" ctld_up || die "slurmctld not answering: $(tail -5 "$BASE/log/slurmctld.log" 2>/dev/null)"

# ---------------------------------------------------------------- slurmd(s)
for n in "${NODE_NAMES[@]}"; do
  mkdir -p "$BASE/spool/slurmd-$n" "$BASE/tmp/$n"
  if ! alive_pid "$BASE/run/slurmd-$n.pid" slurmd >/dev/null; then
    slurmd -f "$CONF" -N "$n" </dev/null >/dev/null 2>&1 9>&- \
      || die "slurmd $n failed: $(tail -5 "$BASE/log/slurmd-$n.log" 2>/dev/null)"
  fi
done
log "slurmd ${NODE_NAMES[*]} on ports $SLURMD_PORT-$((SLURMD_PORT + NODES - 1))"

# ---------------------------------------------------------------- wait idle
all_idle() {
  local out n
  out=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  for n in "${NODE_NAMES[@]}"; do
    grep -Eq "^${n} (idle|mix|alloc)\$" <<< "$out" || return 1
  done
}
deadline=$((SECONDS + TIMEOUT))
resumed=0
until all_idle; do
  if [ $SECONDS -ge $deadline ]; then
    sinfo -N >&2 || true
    die "nodes not idle after ${TIMEOUT}s (see $BASE/log)"
  fi
  # a node left DOWN/DRAIN by an earlier run (state kept in $BASE/state):
  # resume it once
  if [ $resumed = 0 ] && sinfo -h -N -o '%t' 2>/dev/null | grep -Eq 'down|drain'; then
    scontrol update NodeName="$(IFS=,; echo "${NODE_NAMES[*]}")" State=RESUME 2>/dev/null || true
    resumed=1
  fi
  sleep 0.1
done
t_idle=$(( $(now_us) - t_start0 ))

# ---------------------------------------------------------------- wait scheduler
# slurmctld runs its first main scheduling pass only ~3 s after it starts;
# a batch job submitted before that waits for it (and `sbatch --wait`, which
# polls at growing intervals, then returns only after ~10 s). Wait for that
# first pass (sdiag's main "Total cycles" >= 1) so that the first job of a
# test starts like every later one (~1 s). Skip with IPMTC_SLURM_WAIT_SCHED=0.
sched_cycles() {
  sdiag 2>/dev/null | awk '/Main schedule statistics/ { m = 1 } m && /Total cycles:/ { print $3; exit }'
}
sched_ran() { local c; c=$(sched_cycles); [ -n "$c" ] && [ "$c" -ge 1 ]; }
if [ "$WAIT_SCHED" = 1 ] && ! sched_ran; then
  if [ -z "$(sched_cycles)" ]; then
    log "note: cannot read sdiag's scheduler cycles: not waiting for the first scheduling pass"
  else
    wait_for "$TIMEOUT" sched_ran || die "slurmctld ran no scheduling pass within ${TIMEOUT}s"
  fi
fi
t_start=$(( $(now_us) - t_start0 ))

# ---------------------------------------------------------------- outputs
cat > "$BASE/env.sh" <<EOF
# source me: points Slurm's client commands at the ipmtc test cluster
export SLURM_CONF=$CONF
export IPMTC_SLURM_BASE=$BASE
export IPMTC_SLURM_NODES=$NODES
export IPMTC_SLURM_CPUS=$CPUS
EOF
printf 'INSTALL_S=%s\nSTART_S=%s\nIDLE_S=%s\n' "$(secs "$t_install")" "$(secs "$t_start")" "$(secs "$t_idle")" > "$BASE/timings.env"
log "ready: $(sinfo -h -o '%P %a %D %t %N' | tr '\n' ' ')"
log "use: source $BASE/env.sh"
echo "ipmtc-slurm: install $(secs "$t_install")s start $(secs "$t_start")s (nodes idle after $(secs "$t_idle")s) nodes=$NODES SLURM_CONF=$CONF"
