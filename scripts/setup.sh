#!/usr/bin/env bash
# Installs what rivernode needs to build (and, with --test, to run its tests)
# on Debian 12, as root. Idempotent: packages already present are skipped and
# apt's index is refreshed only when something is missing.
set -euo pipefail

want_test=0
for arg in "$@"; do
    case "$arg" in
        --test) want_test=1 ;;
        *) echo "usage: $0 [--test]" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh installs Debian packages: run it as root" >&2
    exit 1
fi

# Build: a C toolchain for the bundled SQLite, protoc for the containerd
# client's generated code, libvirt headers for the libvirt bindings.
packages=(build-essential pkg-config protobuf-compiler libvirt-dev ca-certificates curl)
# Runtime: containerd and runc run the tasks; nft applies the node's firewall
# table; dropbear is injected into VPS images without an SSH server; ssh logs in.
packages+=(containerd runc nftables dropbear-bin openssh-client openssh-sftp-server)
# VM VPS: libvirt runs QEMU; qemu-img judges base images and makes VM disks;
# OVMF is the VMs' UEFI firmware; prlimit (util-linux) bounds qemu-img.
packages+=(libvirt-daemon-system qemu-system-x86 qemu-utils ovmf util-linux)
# Runtime of the tests: systemd-analyze checks the unit files; the kernel
# tests boot Debian's kernel in QEMU (TCG) with a static busybox as userland
# and decompress its .ko.xz modules with xz.
if [ "$want_test" = 1 ]; then
    packages+=(systemd qemu-system-x86 linux-image-amd64 busybox-static xz-utils)
    # Task tests: images are built at test time with umoci, converted and pushed
    # to a loopback registry with skopeo.
    packages+=(umoci skopeo docker-registry iproute2)
    # The VPS test of an image with its own sshd builds Debian with debootstrap.
    packages+=(debootstrap)
    # `connect` is tested as a person uses it: typed into a terminal (tmux).
    packages+=(tmux)
    # VMs: generated domain XML is checked against libvirt's schema
    # (virt-xml-validate runs xmllint); the NoCloud seed is read back by isoinfo.
    packages+=(libvirt-clients libxml2-utils genisoimage)
    # A VM boots under a private libvirtd (TCG) in the VM tests; qemu-img
    # makes their disks.
    packages+=(libvirt-daemon libvirt-daemon-driver-qemu qemu-utils)
    # The UEFI VM test's disk: a FAT filesystem (dosfstools, mtools) with a
    # standalone GRUB as its EFI loader.
    packages+=(grub-efi-amd64-bin dosfstools mtools)
    # The in-instance API is tested with Vast.ai's own CLI (PyPI), in a venv.
    packages+=(python3-venv)
    # /metrics pages are checked with promtool (Debian's prometheus package).
    packages+=(prometheus)
    # The dashboard's browser test drives Debian's Chromium (never a
    # downloaded browser) with playwright-core.
    packages+=(chromium)
fi
# The web dashboard is bundled at build time with Node.js and npm. A
# machine may have them from elsewhere (NodeSource's nodejs carries npm):
# Debian's packages only where there are none.
if ! command -v npm >/dev/null 2>&1; then
    packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Rust: Debian 12's own cargo is too old for our dependencies; use rustup's.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: installing the Rust toolchain with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
fi

# libvirt's QEMU driver, run as root, resolves its default user even when
# qemu.conf names root: the user must exist (Debian's libvirt-daemon-system
# makes it; the tests run libvirtd without that package).
if [ "$want_test" = 1 ]; then
    getent group kvm >/dev/null || groupadd -r kvm
    getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
    getent passwd libvirt-qemu >/dev/null ||
        useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
fi

# The dashboard's front-end packages, as web/package-lock.json pins them
# (the build itself is then offline; build.rs runs this too when missing).
web="$(cd "$(dirname "$0")/../web" && pwd)"
if [ ! -d "$web/node_modules" ] || [ "$web/package-lock.json" -nt "$web/node_modules" ]; then
    echo "setup: installing the dashboard's npm packages (web/package-lock.json)"
    (cd "$web" && npm ci --no-audit --no-fund --loglevel=error)
fi

# schemathesis (PyPI), pinned, tests the host against its OpenAPI document.
if [ "$want_test" = 1 ]; then
    venv=/opt/rivernode-test/schemathesis
    if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "4.32.5"; then
        echo "setup: installing schemathesis 4.32.5 (PyPI) in $venv"
        /usr/bin/python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check schemathesis==4.32.5
    fi
fi

# The real `vastai` CLI (PyPI), pinned, for the in-instance API's test.
if [ "$want_test" = 1 ]; then
    venv=/opt/rivernode-test/vastai
    if ! "$venv/bin/vastai" --version 2>/dev/null | grep -qx 1.9.1; then
        echo "setup: installing vastai 1.9.1 (PyPI) in $venv"
        /usr/bin/python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check vastai==1.9.1
    fi
fi
