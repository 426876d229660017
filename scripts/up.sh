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
exec /usr/local/bin/rivernode up "$@"
