#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and CI: setup/slurm_local.sh start|stop|status
#
#   start   install slurmctld/slurmd/slurm-client/munge if missing (Debian/Ubuntu, apt), write slurm.conf for this
#           machine, start munged, slurmctld and slurmd, wait until the node is idle. A no-op when already running.
#   stop    cancel queued/running jobs, stop the daemons this script started (by recorded pid), restore
#           /etc/slurm/slurm.conf, remove the state (logs are kept until the next start).
#   status  print the daemons and `sinfo`; exit 0 when the cluster is up, 3 otherwise.
#
# Needs root (apt, munge user, /etc/slurm). No systemd needed. Environment:
#   LINGUA_SLURM_DIR      state, spool, pid and log files (default /tmp/lingua-slurm)
#   LINGUA_SLURM_TIMEOUT  seconds to wait for the node to become idle (default 60)
#
# Why the settings below (measured on Debian 12, SLURM 22.05, no systemd):
# - munged keeps inherited file descriptors open, and so would slurmctld/slurmd: a caller capturing our output
#   (CI, subprocess) would hang waiting for EOF. Every daemon starts with stdio on files and fds >2 closed.
# - ProctrackType=proctrack/linuxproc: the default (cgroup) needs systemd/cgroup setup; without it jobs report
#   COMPLETED, exit 0, and run nothing. Tests must therefore assert on what a job wrote, never on its state alone.
# - AuthInfo=cred_expire=5: a requeued job waits cred_expire+1 s before it may run again (5 is the lowest value
#   accepted; lower silently falls back to 120 s).
# - SchedulerParameters=bf_interval=1,sched_interval=2 halves scheduling latency; MailProg=/bin/true avoids noise.
set -euo pipefail

DIR=${LINGUA_SLURM_DIR:-/tmp/lingua-slurm}
TIMEOUT=${LINGUA_SLURM_TIMEOUT:-60}
ETC_CONF=/etc/slurm/slurm.conf
MARK="# written by lingua setup/slurm_local.sh"
PKGS=(slurmctld slurmd slurm-client munge)

log() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] error: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] && return 0
  if command -v sudo >/dev/null; then exec sudo -E bash "$0" "$@"; fi
  die "must run as root (apt, the munge user and /etc/slurm need it)"
}

# Is the daemon recorded in pidfile $1 (named <daemon>.pid) alive? Checks the name too: after a reboot the
# recorded pid may belong to another process, which stop must never kill.
alive() {
  local pid
  [ -f "$1" ] && pid=$(cat "$1") && [ -n "$pid" ] || return 1
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$(basename "$1" .pid)" ]
}

# Run a command detached: new session, stdio on files, every inherited fd above 2 closed.
detach() {
  local out=$1; shift
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null || true
    done
    exec setsid -f "$@" </dev/null >>"$out" 2>&1
  )
}

install_packages() {
  local missing=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM 22.05+ and munge yourself"
  log "installing ${missing[*]} ..."
  local t0=$SECONDS policy=/usr/sbin/policy-rc.d own_policy=0
  # Keep the packages' init scripts from starting daemons with the stock config: we start our own.
  if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy; own_policy=1; fi
  export DEBIAN_FRONTEND=noninteractive
  local apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)
  if ! apt-get install "${apt_opts[@]}" "${missing[@]}" >"$DIR/apt.log" 2>&1; then
    apt-get update -q >>"$DIR/apt.log" 2>&1 || true
    apt-get install "${apt_opts[@]}" "${missing[@]}" >>"$DIR/apt.log" 2>&1 \
      || { [ $own_policy = 1 ] && rm -f $policy; tail -n 20 "$DIR/apt.log" >&2; die "apt-get install failed (log: $DIR/apt.log)"; }
  fi
  [ $own_policy = 1 ] && rm -f $policy
  log "installed in $((SECONDS - t0)) s"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then
    log "munged already running (not started by this script)"
    return 0
  fi
  [ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  # munged daemonizes itself; --force recovers from a stale socket left by a killed munged.
  detach "$DIR/log/munged.out" runuser -u munge -- /usr/sbin/munged --force
  local i
  for i in $(seq 50); do munge_works && break; sleep 0.1; done
  munge_works || { tail -n 20 /var/log/munge/munged.log "$DIR/log/munged.out" >&2 2>/dev/null || true; die "munged did not start"; }
  cp /run/munge/munged.pid "$DIR/run/munged.pid"
}

write_conf() {
  local host node
  host=$(hostname -s)
  # First line of `slurmd -C`: NodeName=... CPUs=... Boards=... SocketsPerBoard=... RealMemory=...
  node=$(slurmd -C | head -n 1)
  [[ $node == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node"
  cat > "$DIR/slurm.conf" <<EOF
$MARK: a single-node cluster for tests ($DIR)
ClusterName=lingua
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mkdir -p /etc/slurm
  if [ -f $ETC_CONF ] && ! grep -qF "$MARK" $ETC_CONF && [ ! -f "$DIR/slurm.conf.orig" ]; then
    cp -p $ETC_CONF "$DIR/slurm.conf.orig"
    log "backed up $ETC_CONF to $DIR/slurm.conf.orig (restored by stop)"
  fi
  cp "$DIR/slurm.conf" $ETC_CONF
}

node_state() { timeout 5 sinfo -h -N -o %T 2>/dev/null | head -n 1; }

is_up() {
  alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && munge_works || return 1
  case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

show_logs() {
  local f
  for f in "$DIR"/log/*.log "$DIR"/log/*.out; do
    [ -s "$f" ] || continue
    [[ $f == *.out && -s ${f%.out}.log ]] && continue  # the same lines, once the daemon had its log file open
    echo "----- $f (last 15 lines)" >&2
    tail -n 15 "$f" >&2
  done
}

# A failed start: show why, stop whatever did start, restore /etc/slurm/slurm.conf, keep the logs.
fail_start() {
  show_logs
  stop_daemons >/dev/null 2>&1 || true
  restore_conf
  die "$*; logs above, all in $DIR/log"
}

start() {
  need_root "$@"
  if is_up; then
    log "already running (node $(node_state), state in $DIR)"
    return 0
  fi
  local t0=$SECONDS
  # A half-started or crashed cluster: clear it before starting fresh.
  if [ -d "$DIR/run" ]; then stop_daemons; fi
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log"
  install_packages
  start_munge
  write_conf
  local t1=$SECONDS
  detach "$DIR/log/slurmctld.out" slurmctld -D -i -f "$DIR/slurm.conf"
  detach "$DIR/log/slurmd.out" slurmd -D -f "$DIR/slurm.conf"
  local deadline=$((SECONDS + TIMEOUT)) state="" n
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state || true)
    [ "$state" = idle ] && alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && break
    for n in slurmctld slurmd; do  # a daemon that wrote its pid and died will not come back: fail now
      if [ -f "$DIR/run/$n.pid" ] && ! alive "$DIR/run/$n.pid"; then
        fail_start "$n exited during start"
      fi
    done
    sleep 0.2
  done
  if [ "$state" != idle ]; then
    fail_start "node not idle after ${TIMEOUT}s (state: '${state:-no answer}')"
  fi
  log "up: node $(hostname -s) idle after $((SECONDS - t1)) s (total $((SECONDS - t0)) s); conf $ETC_CONF, state $DIR"
}

# Stop by recorded pid: TERM all at once (each takes ~2 s to exit), KILL what is left after 10 s.
stop_pids() {
  local names=() pids=() n pid i
  for n in "$@"; do
    if alive "$DIR/run/$n.pid"; then names+=("$n"); pids+=("$(cat "$DIR/run/$n.pid")"); kill "${pids[-1]}" 2>/dev/null || true; fi
    rm -f "$DIR/run/$n.pid"
  done
  [ ${#pids[@]} = 0 ] && return 0
  for i in $(seq 100); do
    kill -0 "${pids[@]}" 2>/dev/null || break  # true while any is alive
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then log "${names[$i]} (${pids[$i]}) ignored TERM, killing"; kill -9 "${pids[$i]}" 2>/dev/null || true; fi
  done
  log "stopped ${names[*]} (pids ${pids[*]})"
}

stop_daemons() {
  if alive "$DIR/run/slurmctld.pid"; then
    # Cancel jobs first so their processes (slurmstepd + tasks) do not outlive the daemons.
    local jobs i
    jobs=$(timeout 5 squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(echo $jobs)"
      timeout 5 scancel $jobs 2>/dev/null || true
      for i in $(seq 50); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  stop_pids slurmd slurmctld munged
}

restore_conf() {
  if [ -f $ETC_CONF ] && grep -qF "$MARK" $ETC_CONF; then
    if [ -f "$DIR/slurm.conf.orig" ]; then mv "$DIR/slurm.conf.orig" $ETC_CONF; log "restored $ETC_CONF"
    else rm -f $ETC_CONF; fi
  fi
}

stop() {
  need_root "$@"
  [ -d "$DIR" ] || { log "not running (no $DIR)"; return 0; }
  stop_daemons
  restore_conf
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/slurm.conf"
  log "stopped; logs kept in $DIR/log"
}

status() {
  local n
  for n in slurmctld slurmd munged; do
    if alive "$DIR/run/$n.pid"; then echo "$n: running (pid $(cat "$DIR/run/$n.pid"))"; else echo "$n: not running"; fi
  done
  if command -v sinfo >/dev/null; then timeout 5 sinfo 2>&1 || true; fi
  is_up
}

case "${1:-}" in
  start) start "$@" ;;
  stop) stop "$@" ;;
  status) if status; then exit 0; else exit 3; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
