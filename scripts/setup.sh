#!/usr/bin/env bash
# Installs what Ferry needs on a fresh Debian machine: protoc and the well-known
# types (etcd-client's and our proto build), etcd (the distributed store the tests
# start), ffmpeg (the transcode functions), openssl (the https test's throw-away CA),
# the wasm32-wasip2 target (WebAssembly functions), and boto3 and moto[server] (the
# Lambda and S3 tests). Skips what is there.
set -euo pipefail

need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
# The well-known types (google/protobuf/*.proto) etcd-client's protos import: only
# recommended by protobuf-compiler, so not installed with --no-install-recommends.
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null || need+=(etcd-server)
command -v ffmpeg >/dev/null || need+=(ffmpeg)
command -v python3 >/dev/null || need+=(python3 python3-pip)
command -v openssl >/dev/null || need+=(openssl)
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
# moto[server]: the S3 tests run its S3-compatible server on a loopback port.
py=()
python3 -c 'import boto3' >/dev/null 2>&1 || py+=(boto3)
python3 -c 'import moto.server, flask, flask_cors' >/dev/null 2>&1 || py+=('moto[server]')
if ((${#py[@]})); then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "setup: installing pip"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  echo "setup: installing ${py[*]}"
  python3 -m pip install -q "${py[@]}" 2>/dev/null || python3 -m pip install -q --break-system-packages "${py[@]}"
fi
