#!/usr/bin/env bash
# Runs the Temporal server (all four services in one process) on PostgreSQL in the foreground, with
# config/vsp.yaml (its header lists the settings). Run schema.sh first; register the namespace and VSP's
# search attributes once it serves (deploy/temporal/main.ts does all three on the dev machine).
# The frontend has no authorizer: it binds VSP_TEMPORAL_IP (loopback by default); on a network, put mTLS in
# front of it (README "Production", deploy/production/README.md section 5).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/temporal/common.sh
. "$here/common.sh"
require_binaries_and_role
export VSP_TEMPORAL_DYNAMIC_CONFIG="${VSP_TEMPORAL_DYNAMIC_CONFIG:-$here/dynamicconfig.yaml}"
exec "$TEMPORAL_SERVER_BIN" --root "$here" --config config --env vsp --allow-no-auth start
