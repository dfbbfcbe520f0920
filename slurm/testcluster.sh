#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests and benchmarks (Debian's slurm-wlm 22.05 + munge).
#
#   slurm/testcluster.sh install   apt-get install slurm-wlm and munge (root; apt-get update only when needed)
#   slurm/testcluster.sh start     write the config into the state folder, start munged, slurmctld, slurmd and
#                                  wait until the node is idle; does nothing when the cluster already runs
#   slurm/testcluster.sh stop      cancel the cluster's jobs, stop the daemons this script started (by pid)
#   slurm/testcluster.sh status    daemons and node state; exit 0 when healthy, 3 when not running
#   slurm/testcluster.sh env       the line that points slurm's commands at the cluster (eval it)
#
# State folder: $SLURM_TEST_DIR (default /tmp/slurm-test): etc/ (slurm.conf, gres.conf), state/, spool/, log/,
# run/ (pid files, the pids this script started), dev/ (two placeholder GPUs: /dev/null-like device nodes).
# Clients find the cluster through SLURM_CONF=$SLURM_TEST_DIR/etc/slurm.conf (see `env`); nothing under /etc
# is written except the munge key, which is created when missing.
# Overridable: SLURM_TEST_CTLD_PORT (6817), SLURM_TEST_SLURMD_PORT (6818), SLURM_TEST_START_TIMEOUT (60 s).
#
# SLURM_TEST_NODES=2: the two-node variant - two slurmd daemons on this machine, nodes n1 and n2 (NodeAddr
# 127.0.0.1, ports SLURMD_PORT and SLURMD_PORT+1, one CPU and one placeholder GPU each), each started as
# `slurmd -N <node>`; give it its own SLURM_TEST_DIR and ports to run beside the one-node cluster.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATES=$HERE/testcluster
DIR=${SLURM_TEST_DIR:-/tmp/slurm-test}
CONF=$DIR/etc/slurm.conf
PIDS=$DIR/run/pids
HOST=$(hostname -s)
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}
NODE_COUNT=${SLURM_TEST_NODES:-1}
case $NODE_COUNT in
    1) NODES=$HOST; SLURMDS=(slurmd); CONF_TEMPLATE=slurm.conf.in; GRES_TEMPLATE=gres.conf.in ;;
    2) NODES=n1,n2; SLURMDS=(slurmd@n1 slurmd@n2); CONF_TEMPLATE=slurm-2node.conf.in; GRES_TEMPLATE=gres-2node.conf.in ;;
    *) echo "testcluster: error: SLURM_TEST_NODES must be 1 or 2, got '$NODE_COUNT'" >&2; exit 64 ;;
esac
START_TIMEOUT=${SLURM_TEST_START_TIMEOUT:-60}
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin

say() { echo "testcluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
    [[ $EUID -eq 0 ]] || { say "error: must run as root (the daemons and apt-get need it)"; exit 2; }
}

# ---------------------------------------------------------------- install

installed() {
    local cmd
    for cmd in slurmctld slurmd slurmstepd sbatch squeue sinfo scontrol srun munged munge unmunge; do
        command -v "$cmd" >/dev/null 2>&1 || return 1
    done
}

cmd_install() {
    if installed; then
        say "slurm and munge already installed ($(sbatch --version 2>/dev/null || echo '?'))"
        return 0
    fi
    need_root
    command -v apt-get >/dev/null 2>&1 || { say "error: apt-get not found (a Debian/Ubuntu machine is needed)"; exit 2; }
    export DEBIAN_FRONTEND=noninteractive
    local pkg candidate update=0
    for pkg in slurm-wlm munge; do
        candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
        [[ -n $candidate && $candidate != "(none)" ]] || update=1
    done
    if [[ $update -eq 1 ]]; then
        say "apt-get update"
        apt-get update -q >&2 || { say "error: apt-get update failed"; exit 2; }
    fi
    say "apt-get install slurm-wlm munge"
    apt-get install -y -q --no-install-recommends slurm-wlm munge >&2 \
        || { say "error: apt-get install slurm-wlm munge failed"; exit 2; }
    installed || { say "error: slurm or munge commands missing after install"; exit 2; }
}

# ---------------------------------------------------------------- helpers

# pid_is PID NAME: the process PID exists and is NAME (guards against a recycled pid)
pid_is() {
    [[ -n ${1:-} && -r /proc/$1/comm ]] && [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]]
}

recorded_pid() {  # recorded_pid NAME: the pid this script recorded for NAME, if any
    [[ -f $PIDS ]] || return 0
    awk -v n="$1" '$1 == n {print $2}' "$PIDS" | tail -n 1
}

record_pid() {  # record_pid NAME PID
    mkdir -p "$DIR/run"
    { [[ -f $PIDS ]] && grep -v "^$1 " "$PIDS" || true; echo "$1 $2"; } > "$PIDS.tmp"
    mv "$PIDS.tmp" "$PIDS"
}

forget_pid() {
    [[ -f $PIDS ]] || return 0
    { grep -v "^$1 " "$PIDS" || true; } > "$PIDS.tmp"
    mv "$PIDS.tmp" "$PIDS"
}

comm_of() { echo "${1%@*}"; }  # a daemon instance (slurmd@n1) is the process slurmd
pidfile_of() { echo "$DIR/run/${1/@/-}.pid"; }  # slurmd@n1: run/slurmd-n1.pid (SlurmdPidFile with %n)

pidfile_pid() {  # pidfile_pid FILE NAME: the pid in FILE when that process is NAME
    local pid
    [[ -f $1 ]] || return 0
    pid=$(tr -dc '0-9' < "$1")
    pid_is "$pid" "$2" && echo "$pid" || true
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() {  # the nodes' state as sinfo reports it (idle, mixed, down*, drained, ...): a node's that is not
    local states  # ready where there is one, else the first node's; nothing when sinfo does not answer
    states=$(timeout 10 sinfo -h -N -n "$NODES" -o '%T' 2>/dev/null || true)
    [[ -n $states ]] || return 0
    grep -v -x -E 'idle|mixed|allocated|completing' <<< "$states" | head -n 1 | grep . || head -n 1 <<< "$states"
}

healthy() {
    local d
    [[ -f $CONF ]] || return 1
    pid_is "$(pidfile_pid "$DIR/run/slurmctld.pid" slurmctld)" slurmctld || return 1
    for d in "${SLURMDS[@]}"; do
        pid_is "$(pidfile_pid "$(pidfile_of "$d")" slurmd)" slurmd || return 1
    done
    munge_ok || return 1
    case $(node_state) in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

render() {  # render TEMPLATE OUT
    local mem_mb
    # RealMemory above what the node has drains it; 20000 MB where there is room for it
    mem_mb=$(awk '/^MemTotal:/ {m = int($2 / 1024) - 1024; print (m < 20000 ? m : 20000)}' /proc/meminfo)
    sed -e "s|@NODE@|$HOST|g" -e "s|@DIR@|$DIR|g" -e "s|@CPUS@|$(nproc)|g" -e "s|@MEMORY_MB@|$mem_mb|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@SLURMD_PORT2@|$((SLURMD_PORT + 1))|g" -e "s|@HALF_MEMORY_MB@|$((mem_mb / 2))|g" "$1" > "$2"
}

show_logs() {
    local f
    for f in "$DIR"/log/slurm*.log; do
        [[ -f $f ]] && { say "last lines of $f:"; tail -n 15 "$f" >&2; }
    done
    return 0
}

# ---------------------------------------------------------------- start / stop / status

start_munge() {
    if munge_ok; then
        return 0  # a munged already runs (ours from an earlier start, or the system's): use it
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        say "creating $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    local stale
    stale=$(pidfile_pid "$MUNGE_PID" munged)
    [[ -n $stale ]] && { say "munged $stale runs but does not answer; restarting it"; kill "$stale" || true; sleep 1; }
    rm -f "$MUNGE_PID"
    runuser -u munge -- munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    local i pid=
    for ((i = 0; i < 50; i++)); do
        pid=$(pidfile_pid "$MUNGE_PID" munged)
        [[ -n $pid ]] && munge_ok && break
        sleep 0.1
    done
    [[ -n $pid ]] && munge_ok || die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
    record_pid munged "$pid"
}

start_daemon() {  # start_daemon NAME: slurmctld, slurmd or slurmd@NODE, daemonized, pid from its pid file
    local name=$1 comm pidfile pid i
    comm=$(comm_of "$name")
    pidfile=$(pidfile_of "$name")
    pid=$(pidfile_pid "$pidfile" "$comm")
    if [[ -n $pid ]]; then
        record_pid "$name" "$pid"
        return 0
    fi
    rm -f "$pidfile"
    if [[ $name == *@* ]]; then
        "$comm" -N "${name#*@}" -f "$CONF" || { show_logs; die "$name did not start"; }
    else
        "$comm" -f "$CONF" || { show_logs; die "$name did not start"; }
    fi
    for ((i = 0; i < 100; i++)); do
        pid=$(pidfile_pid "$pidfile" "$comm")
        [[ -n $pid ]] && break
        sleep 0.1
    done
    [[ -n $pid ]] || { show_logs; die "$name exited right after start"; }
    record_pid "$name" "$pid"
}

cmd_start() {
    need_root
    installed || { say "error: slurm/munge not installed; run: $0 install"; exit 2; }
    mkdir -p "$DIR"/{etc,state,spool,log,run,dev}
    chmod 0755 "$DIR"
    render "$TEMPLATES/$CONF_TEMPLATE" "$DIR/etc/slurm.conf.new"
    render "$TEMPLATES/$GRES_TEMPLATE" "$DIR/etc/gres.conf.new"
    if [[ -f $CONF ]] && cmp -s "$CONF" "$DIR/etc/slurm.conf.new" && cmp -s "$DIR/etc/gres.conf" "$DIR/etc/gres.conf.new"; then
        if healthy; then
            rm -f "$DIR"/etc/*.new
            say "already running (nodes $NODES $(node_state); SLURM_CONF=$CONF)"
            return 0
        fi
    elif [[ -n $(pidfile_pid "$DIR/run/slurmctld.pid" slurmctld)$(for d in "${SLURMDS[@]}"; do pidfile_pid "$(pidfile_of "$d")" slurmd; done) ]]; then
        say "configuration changed: restarting slurmctld and slurmd"
        stop_slurm
    fi
    for f in slurm.conf gres.conf; do
        [[ -f $DIR/etc/$f.new ]] && mv "$DIR/etc/$f.new" "$DIR/etc/$f"
    done
    # two placeholder GPUs: character devices (same numbers as /dev/null), so that slurmd accepts them and sets
    # CUDA_VISIBLE_DEVICES in jobs; plain files where mknod is not allowed (jobs still schedule, no variable)
    local g
    for g in gpu0 gpu1; do
        [[ -c $DIR/dev/$g ]] || { rm -f "$DIR/dev/$g"; mknod -m 0666 "$DIR/dev/$g" c 1 3 2>/dev/null || : > "$DIR/dev/$g"; }
    done
    start_munge
    start_daemon slurmctld
    local d
    for d in "${SLURMDS[@]}"; do start_daemon "$d"; done
    local deadline=$((SECONDS + START_TIMEOUT)) state resumed=0
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
            idle|mixed|allocated) say "up: nodes $NODES $state, partitions cpu (default) and gpu; SLURM_CONF=$CONF"; return 0 ;;
            down*|drain*|drained*)
                if ((resumed == 0)); then
                    scontrol update nodename="$NODES" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 0.2
    done
    show_logs
    die "nodes $NODES not idle after ${START_TIMEOUT}s (state: '${state:-none}'); logs in $DIR/log"
}

daemon_pid() {  # daemon_pid NAME: the pid to stop, recorded (slurm daemons: or from their pid file in $DIR)
    local pid comm
    comm=$(comm_of "$1")
    pid=$(recorded_pid "$1")
    if [[ $1 != munged ]] && ! pid_is "$pid" "$comm"; then
        pid=$(pidfile_pid "$(pidfile_of "$1")" "$comm")
    fi
    pid_is "$pid" "$comm" && echo "$pid" || true
}

stop_daemons() {  # stop_daemons NAME...: TERM all at once (each takes 1-2 s to exit), KILL what is left after 10 s
    local name pid i left
    local -A pids=()
    for name in "$@"; do
        pid=$(daemon_pid "$name")
        [[ -n $pid ]] && { pids[$name]=$pid; kill -TERM "$pid" 2>/dev/null || true; }
        forget_pid "$name"
    done
    for ((i = 0; i < 100; i++)); do
        left=0
        for name in "${!pids[@]}"; do pid_is "${pids[$name]}" "$(comm_of "$name")" && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for name in "${!pids[@]}"; do
        if pid_is "${pids[$name]}" "$(comm_of "$name")"; then
            say "$name ${pids[$name]} did not stop on TERM; killing it"
            kill -KILL "${pids[$name]}" 2>/dev/null || true
        fi
        say "stopped $name (${pids[$name]})"
    done
}

cancel_jobs() {  # cancel every job of the test cluster, wait (10 s at most) for them to end
    local jobs i
    if [[ -n $(pidfile_pid "$DIR/run/slurmctld.pid" slurmctld) ]]; then
        jobs=$(timeout 10 squeue -h -o '%i' 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            say "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [[ -z $(timeout 10 squeue -h -t running,completing -o '%i' 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
}

stop_slurm() {
    cancel_jobs
    stop_daemons "${SLURMDS[@]}" slurmctld
}

cmd_stop() {
    need_root
    cancel_jobs
    stop_daemons "${SLURMDS[@]}" slurmctld munged  # munged only where this script started it
    rm -f "$PIDS"
}

cmd_status() {
    local name pid running=0
    for name in munged slurmctld "${SLURMDS[@]}"; do
        pid=$(recorded_pid "$name")
        if [[ $name != munged ]]; then
            pid=${pid:-$(pidfile_pid "$(pidfile_of "$name")" "$(comm_of "$name")")}
        fi
        if pid_is "$pid" "$(comm_of "$name")"; then
            echo "$name: running ($pid)"
            running=1
        else
            echo "$name: not started by testcluster.sh"
        fi
    done
    echo "munge: $(munge_ok && echo ok || echo 'not answering')"
    echo "SLURM_CONF=$CONF"
    if [[ -f $CONF ]]; then
        timeout 10 sinfo 2>&1 || true
    fi
    if healthy; then
        return 0
    fi
    ((running)) && return 1 || return 3
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env   (state folder: \$SLURM_TEST_DIR, default /tmp/slurm-test)" >&2; exit 64 ;;
esac
