#!/usr/bin/env bash
# Installs l3fabric and everything its tests use on a Debian machine: the Debian packages
# (BIRD, FRR, reference CNI plugins, ping, ...) and the project itself, editable, with its
# test extras. Run as root (or a user with sudo). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3-pip python3-venv iproute2 iputils-ping containernetworking-plugins
    bird2 frr iptables nftables tcpdump
    # IP-in-IP tests run in a throw-away VM with Debian's kernel (this kernel has no ipip).
    qemu-system-x86 busybox-static linux-image-amd64
)
PYTHON=${PYTHON:-python3}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

export DEBIAN_FRONTEND=noninteractive
as_root apt-get update
as_root apt-get install -y "${APT_PACKAGES[@]}"

# Debian's own python3 is "externally managed" (PEP 668) and refuses plain pip installs;
# a pyenv or venv python is not, and must not be given the override.
pip_flags=()
if "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'
then
    pip_flags+=(--break-system-packages)
fi
"$PYTHON" -m pip install "${pip_flags[@]}" -e '.[test]'

# pyenv only sees new console scripts (l3fabric, l3fabric-cni) after a rehash.
if command -v pyenv >/dev/null; then
    pyenv rehash
fi
echo "l3fabric installed: $(command -v l3fabric || echo 'not on PATH')"
