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
# (set FERRY_DEMO_KEEP=1 to keep the data folder and the transcoded files)
[ -n "${FERRY_DEMO_KEEP:-}" ] && trap 'kill $up 2>/dev/null; wait $up 2>/dev/null; echo "kept $data"' EXIT
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
echo "== ferry invoke hello --async --wait   (a durable task: queued, run, result stored)"
"$ferry" invoke hello --async --wait --data '{"name":"async"}'

echo "== transcode: a 6 s 1280x720 test clip (ffmpeg lavfi, no download) into an H.265 ladder"
ffmpeg -v error -y -f lavfi -i testsrc2=size=1280x720:rate=25 -f lavfi -i sine=frequency=440 \
  -t 6 -c:v libx264 -pix_fmt yuv420p -c:a aac -shortest "$data/clip.mp4"
"$ferry" deploy functions/transcode
"$ferry" invoke transcode --verbose \
  --data "{\"input\":\"file://$data/clip.mp4\",\"output\":\"file://$data/out/\",\"preset\":\"veryfast\"}" \
  > "$data/manifest.json"
python3 - "$data/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for r in m.get("renditions", []):
    f = r.get("facts", r)
    q = (r.get("quality") or {})
    psnr = (q.get("psnr") or {}).get("average")
    print(f"  {r['name']:>6}  {f.get('width')}x{f.get('height')}  {f.get('codec')}/{f.get('codec_tag')}  "
          f"{(f.get('bitrate_bps') or 0) // 1000} kb/s (target {r.get('target_bitrate_kbps')})  "
          f"{r.get('size_bytes')} bytes  PSNR {psnr} dB")
for k in ("skipped", "failed"):
    for r in m.get(k, []):
        print(f"  {k}: {r.get('name')}: {r.get('reason')}")
print("  cover:", (m.get("cover") or {}).get("path"))
PY
echo "   files: $(ls "$data/out" | tr '\n' ' ')"

echo "== ferry functions"
"$ferry" functions
echo "== ferry nodes"
"$ferry" nodes
