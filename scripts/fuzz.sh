#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (SECONDS each, default 60) and fails if
# any finds a crash. Needs cargo-fuzz (`cargo install cargo-fuzz`); the sanitizer flags it
# uses are unlocked on the stable toolchain with RUSTC_BOOTSTRAP=1.
#
#   scripts/fuzz.sh            # 60 s per target
#   SECONDS_PER_TARGET=600 scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
per=${SECONDS_PER_TARGET:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in signature event request; do
  echo "== fuzz $target for ${per}s"
  cargo fuzz run "$target" -- -max_total_time="$per" -rss_limit_mb=2048 2>&1 | tail -n 3
done
echo "no crash found"
