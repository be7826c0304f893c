#!/usr/bin/env bash
# Builds the real Temporal server and its SQL schema tool from the Go module proxy, once per version:
# OUT/temporal-server-vX and OUT/temporal-sql-tool-vX (default OUT: common.sh's cache, outside the
# repository). Exits at once when both exist. About 11 minutes on 2 shared cores; needs Go >= 1.25
# (the module's go.mod), or a Go that fetches that toolchain from the proxy.
# The schema tool carries the PostgreSQL schemas embedded (--schema-name postgresql/v12/...).
# Usage: deploy/temporal/build.sh [OUT]
set -euo pipefail
# shellcheck source=deploy/temporal/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VERSION="$TEMPORAL_VERSION"
OUT="${1:-$GO_CACHE}"
SERVER="$OUT/temporal-server-$VERSION"
SQL_TOOL="$OUT/temporal-sql-tool-$VERSION"

say() { echo "temporal-build: $*"; }
die() {
  echo "temporal-build: ERROR: $*" >&2
  exit 1
}

if [ -x "$SERVER" ] && [ -x "$SQL_TOOL" ]; then
  say "$SERVER and $SQL_TOOL present"
  exit 0
fi
command -v go >/dev/null 2>&1 || die "go not found: install Go >= 1.25 (go.dev/dl) to build the Temporal server"
mkdir -p "$OUT"
# One build at a time per output folder (setup.sh and a developer may start one together).
exec 9>"$OUT/.temporal-build.lock"
flock 9
if [ -x "$SERVER" ] && [ -x "$SQL_TOOL" ]; then
  say "built by another run meanwhile"
  exit 0
fi

start=$SECONDS
export GOFLAGS=-modcacherw
say "downloading go.temporal.io/server@$VERSION from the module proxy"
mod_dir="$(go mod download -json "go.temporal.io/server@$VERSION" |
  python3 -c 'import json, sys; d = json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error", "no Dir")))')" ||
  die "go mod download go.temporal.io/server@$VERSION failed"
# Built in a writable copy: the module cache is read-only, and `go build` there would not see it as a main module.
src="$OUT/temporal-src-$VERSION"
rm -rf "$src.tmp"
cp -r "$mod_dir" "$src.tmp"
chmod -R u+w "$src.tmp"
rm -rf "$src"
mv "$src.tmp" "$src"

build() {
  local pkg="$1" bin="$2"
  [ -x "$bin" ] && return
  say "building $(basename "$bin") (several minutes)"
  (cd "$src" && nice -n 10 go build -trimpath -ldflags="-s -w" -o "$bin.tmp" "$pkg") || die "go build $pkg failed"
  mv "$bin.tmp" "$bin"
}
build ./cmd/server "$SERVER"
build ./cmd/tools/sql "$SQL_TOOL"
rm -rf "$src"
say "built $SERVER and $SQL_TOOL in $((SECONDS - start)) s"
