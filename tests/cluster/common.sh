# Sourced by tests/cluster/nodes.sh and slurm.sh (set NAME before sourcing): what both need.
CLUSTER_ROOT=${DPLDM_CLUSTER_DIR:-/tmp/dpldm-cluster}

die() { echo "$NAME: $*" >&2; exit 1; }

# apt_install PKG...: install with apt-get (refreshing the package lists once if that fails)
apt_install() {
    (($#)) || return 0
    echo "$NAME: installing $*" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } \
        || die "could not install $* (apt-get failed)"
}

# remove_state DIR: a cluster's state folder, and the shared parent once both clusters are down
remove_state() {
    rm -rf "$1"
    rmdir "$CLUSTER_ROOT" 2>/dev/null || true
    echo "$NAME: down"
}
