#!/usr/bin/env bash
# The demo: installs what is missing, then runs deploy/devcluster/demo.ts (Temporal dev server with its web
# UI, the repository, a control worker and two host workers on this machine), runs one task and stops it all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash deploy/setup.sh
npm run --silent build
exec node dist/deploy/devcluster/demo.js "$@"
