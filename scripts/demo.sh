#!/usr/bin/env bash
# The main job, on one machine: install what is missing, build, start `ferry up`,
# deploy the example function, invoke it, print the result, stop.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "== building Ferry (release) and the example function"
cargo build --release --locked -p ferry-cli
scripts/build-guests.sh
ferry=target/release/ferry

data=$(mktemp -d)
port=${FERRY_DEMO_PORT:-7070}
export FERRY_URL="http://127.0.0.1:$port" FERRY_TOKEN="demo-$RANDOM$RANDOM"
"$ferry" up --listen "127.0.0.1:$port" --data-dir "$data" --token "$FERRY_TOKEN" >"$data/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "$FERRY_URL/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
sleep 0.5

echo "== ferry deploy functions/hello"
"$ferry" deploy functions/hello
echo "== ferry invoke hello --data '{\"name\":\"ada\"}'"
"$ferry" invoke hello --data '{"name":"ada"}' --verbose
echo "== ferry deploy functions/checksum  (a native package)"
"$ferry" deploy functions/checksum
echo "== echo -n 'hello, ferry' | ferry invoke checksum --raw --data -"
printf 'hello, ferry' | "$ferry" invoke checksum --raw --data - --verbose
echo "== ferry functions"
"$ferry" functions
echo "== ferry nodes"
"$ferry" nodes
