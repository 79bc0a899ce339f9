#!/usr/bin/env bash
# The whole test suite: what CI runs (`.ci/run` calls this). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== build the WebAssembly guests"
scripts/build-guests.sh

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# cargo's last line belongs to whichever crate ran last (often a doc-test run with
# nothing in it); close with the whole suite's count.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } }
     END { print p " passed, " f " failed" }' "$log"
