#!/usr/bin/env bash
# A Docker engine on this machine for the image test (deploy/tests/test_image.py).
#   scripts/docker.sh up     install docker.io + debootstrap if missing, start dockerd if it
#                            is not running (no bridge, no iptables: every container uses
#                            --network host), wait for it, then make the base image
#   scripts/docker.sh base   parley-base:bookworm: a debootstrap'd Debian bookworm (minbase,
#                            python3 3.11) imported with `docker import`; the rootfs tarball
#                            is cached in ~/.cache/parley/, the step is skipped when the image exists
#   scripts/docker.sh down   stop dockerd if `up` started it (var/docker/dockerd.pid), else nothing
# dockerd stays running after the tests (its layer cache makes the next build warm); its log
# is var/docker/dockerd.log; `up` records the pid of a dockerd it starts in var/docker/dockerd.pid.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_DIR="$ROOT/var/docker"
DOCKER=/usr/bin/docker # Debian's client, the same version (20.10) as its daemon
BASE_IMAGE=parley-base:bookworm
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/parley"
ROOTFS_TAR="$CACHE_DIR/debian-bookworm-minbase.tar"
BASE_PACKAGES=python3,python3-venv,ca-certificates
SUDO=$([[ $(id -u) == 0 ]] || echo sudo)

install_missing() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 && [[ -x $DOCKER ]] || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if ((${#missing[@]})); then
        echo "docker.sh: installing ${missing[*]}"
        $SUDO apt-get -o DPkg::Lock::Timeout=120 update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=120 install -y -qq \
            --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

running() { $DOCKER info >/dev/null 2>&1; }

start_dockerd() {
    local driver="$1"
    mkdir -p "$LOG_DIR"
    echo "docker.sh: starting dockerd (storage driver $driver), log $LOG_DIR/dockerd.log"
    $SUDO setsid dockerd --bridge=none --iptables=false --ip-masq=false \
        --storage-driver "$driver" >>"$LOG_DIR/dockerd.log" 2>&1 </dev/null &
    echo $! >"$LOG_DIR/dockerd.pid"
    for _ in $(seq 1 60); do
        running && return 0
        kill -0 "$(cat "$LOG_DIR/dockerd.pid")" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}

up() {
    install_missing
    if ! running; then
        # overlay2 where the kernel allows it; vfs (a full copy per layer) otherwise
        start_dockerd overlay2 || {
            kill "$(cat "$LOG_DIR/dockerd.pid")" 2>/dev/null || true
            sleep 1
            start_dockerd vfs
        } || {
            echo "docker.sh: dockerd did not start; see $LOG_DIR/dockerd.log" >&2
            exit 1
        }
    fi
    base
}

base() {
    mkdir -p "$LOG_DIR"
    if $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        return 0
    fi
    if [[ ! -s $ROOTFS_TAR ]]; then
        local target
        target="$(mktemp -d)"
        echo "docker.sh: debootstrap bookworm (minbase, $BASE_PACKAGES) into $target"
        $SUDO debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$target" \
            http://deb.debian.org/debian >"$LOG_DIR/debootstrap.log" 2>&1 || {
            echo "docker.sh: debootstrap failed; see $LOG_DIR/debootstrap.log" >&2
            exit 1
        }
        # the host's apt sources (with the security suite), and no downloaded package files
        $SUDO cp /etc/apt/sources.list.d/debian.sources "$target/etc/apt/sources.list.d/" 2>/dev/null &&
            $SUDO rm -f "$target/etc/apt/sources.list"
        $SUDO rm -rf "$target"/var/cache/apt/archives/*.deb "$target"/var/lib/apt/lists/*
        mkdir -p "$CACHE_DIR"
        $SUDO tar -C "$target" -cf "$ROOTFS_TAR.tmp" .
        mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
        $SUDO rm -rf "$target"
    fi
    echo "docker.sh: docker import $ROOTFS_TAR as $BASE_IMAGE"
    $DOCKER import --change 'CMD ["/bin/bash"]' "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
}

# Only the dockerd `up` started (its pid, checked to still be a dockerd), never another one.
down() {
    local pid_file="$LOG_DIR/dockerd.pid" pid
    [[ -s $pid_file ]] || {
        echo "docker.sh: dockerd was not started by this script; left running"
        return 0
    }
    pid="$(cat "$pid_file")"
    if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
        echo "docker.sh: stopping dockerd (pid $pid)"
        $SUDO kill "$pid"
        for _ in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "docker.sh: dockerd (pid $pid) still running after 30 s" >&2
            return 1
        fi
    fi
    rm -f "$pid_file"
}

case "${1:-}" in
    up) up ;;
    base) base ;;
    down) down ;;
    *)
        echo "usage: scripts/docker.sh up|base|down" >&2
        exit 2
        ;;
esac
