#!/bin/sh
# Reads the request body on stdin, answers {"bytes":N,"sha256":"..."} on stdout.
set -eu
tmp="${TMPDIR:-/tmp}/input"
cat > "$tmp"
bytes=$(wc -c < "$tmp" | tr -d ' ')
sha=$(sha256sum < "$tmp" | cut -d' ' -f1)
echo "checksum: $bytes bytes" >&2
printf '{"bytes":%s,"sha256":"%s"}\n' "$bytes" "$sha"
