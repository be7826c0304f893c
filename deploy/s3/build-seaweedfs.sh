#!/usr/bin/env bash
# Builds SeaweedFS's `weed` (the S3 server the `cluster` repository backend is tested against) from the Go
# module proxy, once, into a cache outside the repository. Idempotent: exits at once when the binary exists.
# `go install ...@version` is refused for this module (its go.mod has replace directives), so the build runs
# in a copy of the downloaded module source. About 5 minutes on 2 cores.
# Usage: deploy/s3/build-seaweedfs.sh [output dir]   (default /var/cache/vsp/go)
# Progress goes to stderr; the binary's path is the one line on stdout.
set -euo pipefail
VER=${SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}
OUT=${1:-/var/cache/vsp/go}
BIN="$OUT/weed-$VER"
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
exec 3>&1 1>&2
command -v go >/dev/null || { echo "seaweedfs: 'go' is not on PATH (install Go to build the S3 test server)" >&2; exit 1; }
mkdir -p "$OUT"
export GOFLAGS=-modcacherw
echo "seaweedfs: downloading github.com/seaweedfs/seaweedfs@$VER"
dir=$(go mod download -json "github.com/seaweedfs/seaweedfs@$VER" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
src="$OUT/seaweedfs-src-$VER"
rm -rf "$src"
cp -r "$dir" "$src"
chmod -R u+w "$src"
echo "seaweedfs: building $BIN (several minutes)"
(cd "$src" && nice -n 10 go build -trimpath -ldflags='-s -w' -o "$BIN.tmp" ./weed)
mv "$BIN.tmp" "$BIN"
rm -rf "$src"
echo "seaweedfs: built $BIN"
echo "$BIN" >&3
