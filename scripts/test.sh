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
cargo test --workspace --locked
