#!/usr/bin/env bash
# Builds the WebAssembly functions the tests and the demo deploy.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p hello --target wasm32-wasip2
# The runtime tests' misbehaving guest (loops, grows memory, tries files and sockets).
cargo build --release --locked --target wasm32-wasip2 --manifest-path runtime/tests/fixtures/spin/Cargo.toml --target-dir target
# The transcode function (native; its package takes target/release/transcode).
cargo build --release --locked -p transcode
