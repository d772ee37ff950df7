#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the workflow's SLURM tests.
#
#   scripts/slurm-cluster.sh start    install slurm-wlm + munge when missing (apt-get), write
#                                     /etc/slurm/slurm.conf for this host, start munged,
#                                     slurmctld and slurmd, wait until the node is idle
#   scripts/slurm-cluster.sh status   the daemons this script started, and sinfo
#   scripts/slurm-cluster.sh stop     cancel the cluster's jobs, stop exactly the daemons
#                                     this script started (PIDs recorded in the state dir)
#
# `start` is idempotent: when the daemons it started are running (or another SLURM cluster
# answers and this script did not start it), it does nothing. The cluster has no accounting
# daemon: run Snakemake with --slurm-no-account --slurm-status-command squeue.
# Meant for a throw-away test machine (CI container): it needs root and overwrites
# /etc/slurm/slurm.conf unless that file was written by something else (then it refuses).
#
# Environment: ADAMERGE_SLURM_STATE (state dir, default /tmp/adamerge-slurm),
# ADAMERGE_SLURM_MEM_MARGIN_MB (memory kept from SLURM, default 10% of RAM, at least 1024),
# ADAMERGE_SLURM_TIMEOUT (seconds to wait for the node to become idle, default 60).
set -euo pipefail

STATE=${ADAMERGE_SLURM_STATE:-/tmp/adamerge-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by adamerge scripts/slurm-cluster.sh"
TIMEOUT=${ADAMERGE_SLURM_TIMEOUT:-60}
DAEMONS=(munged slurmctld slurmd)

log() { echo "slurm-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

SUDO=()
if [ "$(id -u)" != 0 ]; then SUDO=(sudo); fi
as_root() {
    if [ "${#SUDO[@]}" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "needs root (or sudo) for: $*"; fi
}

# PID of a daemon this script started, if that process is still the daemon.
alive_pid() {
    local name=$1 pid
    [ -f "$STATE/$name.pid" ] || return 1
    pid=$(cat "$STATE/$name.pid")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    # guard against PID reuse: the process must still run the daemon's binary
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qw "$name" || return 1
    echo "$pid"
}

node_state() { timeout 5 sinfo -h -N -o %t 2>/dev/null | head -n1 || true; }

install_packages() {
    local missing=0 cmd
    for cmd in munged slurmctld slurmd sbatch squeue sinfo; do
        command -v "$cmd" >/dev/null || missing=1
    done
    [ "$missing" = 0 ] && return
    command -v apt-get >/dev/null || die "slurm-wlm/munge missing and no apt-get to install them"
    log "installing slurm-wlm and munge with apt-get"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local host cpus mem_kb mem_mb margin real
    host=$(hostname -s)
    cpus=$(nproc)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mem_mb=$((mem_kb / 1024))
    margin=${ADAMERGE_SLURM_MEM_MARGIN_MB:-$((mem_mb / 10 > 1024 ? mem_mb / 10 : 1024))}
    real=$((mem_mb - margin))
    [ "$real" -gt 0 ] || die "RealMemory would be $real MB (MemTotal $mem_mb MB, margin $margin MB)"
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching it"
    fi
    as_root mkdir -p /etc/slurm "$STATE/slurmctld" "$STATE/slurmd"
    as_root tee "$CONF" >/dev/null <<EOF
$MARKER ($(date -u +%FT%TZ))
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue must still see finished jobs when Snakemake polls (no sacct without slurmdbd)
MinJobAge=600
ReturnToService=2
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.daemon.pid
SlurmdPidFile=$STATE/slurmd.daemon.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$real State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    log "wrote $CONF: node $host, $cpus CPUs, RealMemory $real MB"
}

# Start a daemon in the foreground mode, in the background, and record its PID.
launch() {
    local name=$1; shift
    if pid=$(alive_pid "$name"); then log "$name already running (pid $pid)"; return; fi
    nohup "${SUDO[@]}" "$@" </dev/null >>"$STATE/$name.out" 2>&1 &
    echo $! >"$STATE/$name.pid"
    sleep 0.5
    alive_pid "$name" >/dev/null || die "$name exited at once; see $STATE/$name.out"
    log "started $name (pid $(cat "$STATE/$name.pid"))"
}

start() {
    local all=1 d
    mkdir -p "$STATE"
    for d in "${DAEMONS[@]}"; do alive_pid "$d" >/dev/null || all=0; done
    if [ "$all" = 1 ]; then
        log "already running (pids in $STATE)"
        return 0
    fi
    if [ ! -f "$STATE/slurmctld.pid" ] && command -v sinfo >/dev/null && [ -n "$(node_state)" ]; then
        log "a SLURM cluster this script did not start already answers; using it"
        return 0
    fi
    install_packages
    write_conf
    # munge: a key and the socket dir
    if [ ! -s /etc/munge/munge.key ]; then
        as_root mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then as_root mungekey --create --force; else
            as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
        as_root chown munge:munge /etc/munge/munge.key
        as_root chmod 400 /etc/munge/munge.key
    fi
    as_root mkdir -p /run/munge /var/log/munge /var/lib/munge
    as_root chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    launch munged munged --foreground --force
    local i
    for i in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    # -c: start from a clean job state (no jobs of an earlier test run)
    launch slurmctld slurmctld -D -c -f "$CONF"
    launch slurmd slurmd -D -c -f "$CONF"
    log "waiting for the node to become idle"
    local state=""
    for i in $(seq $((TIMEOUT * 2))); do
        state=$(node_state)
        case "$state" in idle*) break ;; esac
        for d in "${DAEMONS[@]}"; do
            alive_pid "$d" >/dev/null || die "$d died; see $STATE/$d.out and $STATE/*.log"
        done
        sleep 0.5
    done
    case "$state" in idle*) ;; *) die "node not idle after ${TIMEOUT}s (state '$state'); see $STATE/*.log" ;; esac
    timeout 5 sinfo >&2
}

stop() {
    local d pid i any=0
    if alive_pid slurmctld >/dev/null; then
        # the cluster is ours: cancel its jobs so that no job step outlives slurmd
        local jobs
        jobs=$(timeout 5 squeue -h -o %i 2>/dev/null || true)
        [ -n "$jobs" ] && timeout 10 scancel $jobs 2>/dev/null || true
    fi
    for d in slurmd slurmctld munged; do
        if pid=$(alive_pid "$d"); then
            any=1
            as_root kill -TERM "$pid" 2>/dev/null || true
            for i in $(seq 40); do alive_pid "$d" >/dev/null || break; sleep 0.25; done
            if alive_pid "$d" >/dev/null; then
                log "$d (pid $pid) ignored SIGTERM; SIGKILL"
                as_root kill -KILL "$pid" 2>/dev/null || true
            fi
            log "stopped $d (pid $pid)"
        fi
        rm -f "$STATE/$d.pid"
    done
    [ "$any" = 1 ] || log "nothing to stop (no daemons recorded in $STATE)"
}

status() {
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(alive_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=3; fi
    done
    if command -v sinfo >/dev/null; then timeout 5 sinfo 2>&1 || true; fi
    return $rc
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
