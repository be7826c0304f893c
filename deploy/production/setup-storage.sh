#!/usr/bin/env bash
# Sets up this host's share of the cluster storage (kernel NFS export + mounts of every other host's VM
# store), see deploy/production/README.md. Usage (as root):
#   deploy/production/setup-storage.sh --host a --config /etc/vsp/cluster.json [--root DIR] [--dry-run]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cli="$repo/dist/deploy/production/applyStorage.js"
command -v node > /dev/null || { echo "error: node (>= 20) is not installed" >&2; exit 1; }
[ -f "$cli" ] || { echo "error: $cli is missing: run 'npm ci && npm run build' in $repo" >&2; exit 1; }
exec node "$cli" "$@"
