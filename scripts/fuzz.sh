#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for a bounded time:
# FUZZ_SECONDS in all (default 240), split evenly. A crash fails the run and
# leaves its input under fuzz/artifacts/<target>/; turn it into a unit test.
# cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP lets the stable toolchain
# take them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O --fuzz-dir fuzz
mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
total=${FUZZ_SECONDS:-240}
each=$(( total / ${#targets[@]} ))
[ "$each" -ge 1 ] || each=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    if ! cargo fuzz run -O --fuzz-dir fuzz "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$each" -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz: $t found a crash (its input is under fuzz/artifacts/$t)"
        exit 1
    fi
    echo "fuzz: $t, ${each}s: $(grep -m1 'stat::number_of_executed_units' "$log" || echo 'runs: ?')"
done
echo "fuzz: ${#targets[@]} targets, ${each}s each, no crash"
