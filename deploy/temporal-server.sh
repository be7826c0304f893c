#!/usr/bin/env bash
# Runs VSP's Temporal dev server (persistent in .vsp/temporal.db, web UI on port + 1000) until Ctrl-C.
# Options go to dist/deploy/devcluster/temporalMain.js: --ip, --port, --ui-port, --db-file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash deploy/setup.sh
npm run --silent build
exec node dist/deploy/devcluster/temporalMain.js "$@"
