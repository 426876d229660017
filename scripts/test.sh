#!/usr/bin/env bash
# The test command: sets up everything the tests need, then builds once and
# runs every test (unit, integration on the real binary), plus fmt and clippy.
# With RIVERNODE_REQUIRE_REAL=1 (CI) a missing real component fails its test
# instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --test
export PATH="$HOME/.cargo/bin:$PATH"

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --no-fail-fast
# Every fuzz target for a bounded time (4 minutes in all; FUZZ_SECONDS=0 skips).
if [ "${FUZZ_SECONDS:-240}" != 0 ]; then
    bash scripts/fuzz.sh
fi
