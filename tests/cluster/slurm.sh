#!/usr/bin/env bash
# A real two-node Slurm cluster on one machine, for the `cluster` tests (tests/test_cluster.py) and by hand:
#
#   tests/cluster/slurm.sh up       # munged + slurmctld + slurmd -N n1 + slurmd -N n2, partition "debug"
#   eval "$(tests/cluster/slurm.sh env)"   # SLURM_CONF for sbatch / srun / squeue / scontrol
#   tests/cluster/slurm.sh status   # "up" / "down" (exit 0 / 1)
#   tests/cluster/slurm.sh down     # every job cancelled, every daemon stopped, the state folder removed
#
# Debian's slurm-wlm 22.05 + munge (apt-get install slurmctld slurmd slurm-client munge when missing).
# No cgroups (proctrack/linuxproc, task/none, jobacct_gather/none), so it runs inside a container.
# Both slurmd listen on 127.0.0.1 with their own Port= (NodeAddr=127.0.0.1: the node names need not
# resolve; launch/slurm/finetune.sbatch takes MASTER_ADDR from the first node's NodeAddr). A private
# munged (own key and socket, AuthInfo=socket=...) and a config under the state folder: nothing in
# /etc is touched. Each node advertises this machine's CPUs; no GPUs (gres) exist. Needs root.
# State: $DPLDM_CLUSTER_DIR (default /tmp/dpldm-cluster)/slurm.
set -euo pipefail

NAME=slurm.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
STATE=$CLUSTER_ROOT/slurm
NODES=(n1 n2)


ensure_packages() {
    local missing=()
    [[ -x /usr/sbin/slurmctld ]] || missing+=(slurmctld)
    [[ -x /usr/sbin/slurmd ]] || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [[ -x /usr/sbin/munged ]] || missing+=(munge)
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
        # the packages' own services may have been started by their install scripts: not ours
        pkill -x slurmctld 2>/dev/null || true; pkill -x slurmd 2>/dev/null || true
    fi
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

is_up() {
    local n
    pid_alive "$STATE/munged.pid" && pid_alive "$STATE/slurmctld.pid" || return 1
    for n in "${NODES[@]}"; do pid_alive "$STATE/slurmd-$n.pid" || return 1; done
}

write_config() {
    local cpus mem ctld host n
    mkdir -p "$STATE"/{ctld,log,munge}
    chmod 700 "$STATE/munge"
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # MB, half: two nodes share it
    host=$(hostname -s)
    ctld=$(free_port)
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge/munge.key"
    cat > "$STATE/slurm.conf" <<EOF
# written by tests/cluster/slurm.sh: a two-node test cluster on one machine
ClusterName=dpldm-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only this long after its requeue (a slurmd refuses the
# job's revoked credential until then: 'Job credential revoked'); default 120 s, 10 s keeps the tests short
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/linear
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=600
MessageTimeout=20
EOF
    for n in "${NODES[@]}"; do
        echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus RealMemory=$mem State=UNKNOWN" \
            >> "$STATE/slurm.conf"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >> "$STATE/slurm.conf"
}

up() {
    [[ $(id -u) == 0 ]] || die "needs root (Slurm daemons run as root here)"
    if is_up; then echo "slurm.sh: already up (${NODES[*]})"; return 0; fi
    down >/dev/null 2>&1 || true
    ensure_packages
    write_config
    export SLURM_CONF=$STATE/slurm.conf
    /usr/sbin/munged --force --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
    /usr/sbin/slurmctld -i
    local n
    for n in "${NODES[@]}"; do /usr/sbin/slurmd -N "$n"; done
    local tries=0
    until [[ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle')" == "${#NODES[@]}" ]]; do
        tries=$((tries + 1))
        if ((tries > 100)); then
            tail -5 "$STATE"/log/*.log >&2 || true
            die "the nodes did not become idle: $(sinfo -h -N -o '%N %T' 2>&1 | tr '\n' ' ')"
        fi
        sleep 0.2
    done
    echo "slurm.sh: up: nodes ${NODES[*]} idle; export SLURM_CONF=$SLURM_CONF"
}

down() {
    export SLURM_CONF=$STATE/slurm.conf
    if [[ -f $SLURM_CONF ]] && pid_alive "$STATE/slurmctld.pid"; then
        scancel --full --quiet "$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')" 2>/dev/null || true
        local i
        for i in 1 2 3 4 5 6 7 8 9 10; do [[ -z "$(squeue -h 2>/dev/null)" ]] && break; sleep 0.5; done
    fi
    local f
    for f in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
        [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true
    done
    sleep 0.5
    # whatever survived (a job step's processes, a daemon that did not take SIGTERM): anything naming our state
    pkill -9 -f -- "$STATE" 2>/dev/null || true
    for f in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
        [[ -f $f ]] && kill -9 "$(cat "$f")" 2>/dev/null || true
    done
    remove_state "$STATE"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) if is_up; then echo up; else echo down; exit 1; fi ;;
    env) echo "export SLURM_CONF=$STATE/slurm.conf" ;;
    *) die "usage: slurm.sh up|down|status|env" ;;
esac
