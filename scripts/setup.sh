#!/usr/bin/env bash
# Installs what Ferry needs on a fresh Debian machine: protoc (etcd-client's and our
# proto build), etcd (the distributed store the tests start), ffmpeg (the transcode
# functions), and the wasm32-wasip2 target (WebAssembly functions). Skips what is there.
set -euo pipefail

need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v etcd >/dev/null || need+=(etcd-server)
command -v ffmpeg >/dev/null || need+=(ffmpeg)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "setup: adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi

# boto3: the Lambda-compatibility test drives the gateway with the real AWS SDK.
if ! python3 -c 'import boto3' >/dev/null 2>&1; then
  echo "setup: installing boto3"
  python3 -m pip install -q boto3 2>/dev/null || python3 -m pip install -q --break-system-packages boto3
fi
