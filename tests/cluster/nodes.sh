#!/usr/bin/env bash
# Two real ssh nodes on one machine, for the `cluster` tests (tests/test_cluster.py) and by hand:
#
#   tests/cluster/nodes.sh up                  # node1 10.77.0.1 and node2 10.77.0.2, sshd on each
#   tests/cluster/nodes.sh exec node1 -- CMD   # run CMD on node1 (its network, hostname, hosts file, processes)
#   tests/cluster/nodes.sh status              # "up" / "down" (exit 0 / 1)
#   tests/cluster/nodes.sh down                # nothing left: no process, no namespace, no veth, no state
#
# Each node is a network namespace (dpldm-node1/2; the two are joined by a veth pair, and the
# addresses live only on those veths) plus its own UTS, mount and PID namespaces: a hostname,
# an /etc/hosts naming both nodes and an /etc/ssh/ssh_config (the test key, no host-key prompts,
# keep-alives so a cut link ends an ssh session within ~10 s) bind-mounted over the machine's,
# and a process table of its own (DeepSpeed's `pkill -f` over pdsh reaches one node only). PID 1
# of a node is a bash that starts sshd (key-only root login) and reaps; `down` SIGKILLs it, which
# takes every process of that node with it. Both nodes see the same files (the repository, /tmp)
# as the nodes of a cluster see a shared file system. `up` installs openssh-server, pdsh and
# iproute2 with apt-get when missing, and is idempotent (a half-up cluster is taken down first).
# Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN). State: $DPLDM_CLUSTER_DIR (default /tmp/dpldm-cluster)/nodes.
set -euo pipefail

NAME=nodes.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
STATE=$CLUSTER_ROOT/nodes
NODES=(node1 node2)
SUBNET=10.77.0

addr_of() { echo "$SUBNET.${1#node}"; }

ensure_packages() {
    local missing=()
    command -v sshd >/dev/null || [[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
    command -v ssh >/dev/null || missing+=(openssh-client)
    command -v pdsh >/dev/null || missing+=(pdsh)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v nsenter >/dev/null || missing+=(util-linux)
    apt_install "${missing[@]}"
}

# PID (in this machine's PID namespace) of a node's PID 1, or nothing
node_init_pid() {
    local f="$STATE/$1/unshare.pid" u
    [[ -f $f ]] || return 0
    u=$(cat "$f")
    kill -0 "$u" 2>/dev/null || return 0
    pgrep -P "$u" | head -1
}

is_up() {
    local n
    for n in "${NODES[@]}"; do
        [[ -n "$(node_init_pid "$n")" ]] || return 1
    done
}

write_files() {
    local n
    mkdir -p "$STATE" /run/sshd
    chmod 700 "$STATE"
    ssh-keygen -q -t ed25519 -N '' -C dpldm-cluster-test -f "$STATE/id_ed25519"
    cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
    {
        echo "127.0.0.1 localhost"
        for n in "${NODES[@]}"; do echo "$(addr_of "$n") $n"; done
    } > "$STATE/hosts"
    cat > "$STATE/ssh_config" <<EOF
Host *
    IdentityFile $STATE/id_ed25519
    IdentitiesOnly yes
    BatchMode yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    ConnectTimeout 5
    ServerAliveInterval 2
    ServerAliveCountMax 4
EOF
    for n in "${NODES[@]}"; do
        mkdir -p "$STATE/$n"
        ssh-keygen -q -t ed25519 -N '' -f "$STATE/$n/ssh_host_ed25519_key"
        cat > "$STATE/$n/sshd_config" <<EOF
ListenAddress $(addr_of "$n")
Port 22
HostKey $STATE/$n/ssh_host_ed25519_key
PidFile $STATE/$n/sshd.pid
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
ClientAliveInterval 2
ClientAliveCountMax 4
MaxStartups 100
Subsystem sftp internal-sftp
EOF
        # PID 1 of the node: hostname, hosts file, ssh client config, then sshd; it reaps orphans
        cat > "$STATE/$n/init.sh" <<EOF
hostname $n
mount --bind $STATE/hosts /etc/hosts
mount --bind $STATE/ssh_config /etc/ssh/ssh_config
/usr/sbin/sshd -D -f $STATE/$n/sshd_config -E $STATE/$n/sshd.log &
while true; do wait || true; sleep 1; done
EOF
    done
}

up() {
    [[ $(id -u) == 0 ]] || die "needs root (network namespaces, sshd)"
    if is_up; then echo "nodes.sh: already up (${NODES[*]})"; return 0; fi
    down >/dev/null 2>&1 || true
    ensure_packages
    write_files
    local n a b
    for n in "${NODES[@]}"; do ip netns add "dpldm-$n"; done
    a=dpldm-v${NODES[0]#node}; b=dpldm-v${NODES[1]#node}
    ip link add "$a" type veth peer name "$b"
    ip link set "$a" netns "dpldm-${NODES[0]}"
    ip link set "$b" netns "dpldm-${NODES[1]}"
    for n in "${NODES[@]}"; do
        ip -n "dpldm-$n" addr add "$(addr_of "$n")/24" dev "dpldm-v${n#node}"
        ip -n "dpldm-$n" link set "dpldm-v${n#node}" up
        ip -n "dpldm-$n" link set lo up
        setsid ip netns exec "dpldm-$n" unshare --uts --mount --pid --fork --mount-proc \
            bash "$STATE/$n/init.sh" > "$STATE/$n/init.log" 2>&1 < /dev/null &
        echo $! > "$STATE/$n/unshare.pid"
    done
    # ready when each node reaches both nodes over ssh
    local tries=0
    until node_exec node1 ssh node2 true 2>/dev/null && node_exec node2 ssh node1 true 2>/dev/null \
          && node_exec node1 ssh node1 true 2>/dev/null && node_exec node2 ssh node2 true 2>/dev/null; do
        tries=$((tries + 1))
        ((tries < 50)) || { cat "$STATE"/*/sshd.log >&2 2>/dev/null || true; die "sshd did not answer on both nodes"; }
        sleep 0.2
    done
    echo "nodes.sh: up: node1 $(addr_of node1), node2 $(addr_of node2) (ssh key $STATE/id_ed25519)"
}

node_exec() {
    local n=$1; shift
    local pid
    pid=$(node_init_pid "$n")
    [[ -n "$pid" ]] || die "$n is not up (tests/cluster/nodes.sh up)"
    nsenter --target "$pid" --net --uts --mount --pid --wd="$PWD" -- "$@"
}

down() {
    local n pid u
    for n in "${NODES[@]}"; do
        pid=$(node_init_pid "$n")
        [[ -n "$pid" ]] && kill -9 "$pid" 2>/dev/null || true  # PID 1 of the node: all its processes go
        if [[ -f "$STATE/$n/unshare.pid" ]]; then
            u=$(cat "$STATE/$n/unshare.pid"); kill -9 "$u" 2>/dev/null || true
        fi
        if ip netns list 2>/dev/null | grep -qw "dpldm-$n"; then
            for pid in $(ip netns pids "dpldm-$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "dpldm-$n" 2>/dev/null || true
        fi
    done
    ip link del dpldm-v1 2>/dev/null || true
    remove_state "$STATE"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) if is_up; then echo up; else echo down; exit 1; fi ;;
    exec)
        [[ $# -ge 3 && "$3" == "--" ]] || die "usage: nodes.sh exec NODE -- CMD [ARGS...]"
        node=$2; shift 3
        [[ " ${NODES[*]} " == *" $node "* ]] || die "unknown node '$node' (${NODES[*]})"
        node_exec "$node" "$@" ;;
    *) die "usage: nodes.sh up|down|status|exec NODE -- CMD" ;;
esac
