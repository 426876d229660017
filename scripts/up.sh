#!/usr/bin/env bash
# The run command: on a fresh Debian 12 machine, as root, installs what
# rivernode needs, builds it, installs /usr/local/bin/rivernode and runs a
# one-node cluster in the foreground (state in /var/lib/rivernode).
# Extra arguments go to `rivernode up` (e.g. --api-port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --locked
install -m 0755 target/release/rivernode /usr/local/bin/rivernode

# Tasks run on containerd. Debian's package starts it under systemd; where
# systemd does not run services (containers, minimal VMs) start it here.
socket=/run/containerd/containerd.sock
if [ ! -S "$socket" ]; then
    systemctl start containerd 2>/dev/null || true
fi
if [ ! -S "$socket" ]; then
    echo "up: starting containerd (log: /var/log/rivernode-containerd.log)"
    setsid containerd >/var/log/rivernode-containerd.log 2>&1 < /dev/null &
    for _ in $(seq 1 100); do [ -S "$socket" ] && break; sleep 0.1; done
fi
# VM VPS run under libvirtd (Debian's package starts it under systemd too).
if [ ! -S /run/libvirt/libvirt-sock ]; then
    systemctl start libvirtd 2>/dev/null || true
fi
if [ ! -S /run/libvirt/libvirt-sock ]; then
    echo "up: starting libvirtd (log: /var/log/rivernode-libvirtd.log)"
    setsid libvirtd >/var/log/rivernode-libvirtd.log 2>&1 < /dev/null &
    for _ in $(seq 1 100); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.1; done
fi
exec /usr/local/bin/rivernode up "$@"
