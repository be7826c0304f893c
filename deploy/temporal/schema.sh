#!/usr/bin/env bash
# Creates or upgrades Temporal's schemas (persistence and visibility) in existing PostgreSQL databases, with
# the schema tool's embedded PostgreSQL 12+ schemas: idempotent, quick when they are current. Run it before
# the server's first start and after upgrading TEMPORAL_VERSION (common.sh). Settings as config/vsp.yaml's
# (VSP_TEMPORAL_SQL_ADDRESS, _USER, _PASSWORD, _DATABASE, VSP_TEMPORAL_VISIBILITY_SQL_*, VSP_TEMPORAL_SQL_TLS).
# The role needs to create tables in both databases (it owns them); creating the databases is left to
# PostgreSQL's administrator (deploy/postgres/pg-cluster.sh createdb on the dev machine).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/temporal/common.sh
. "$here/common.sh"
require_binaries_and_role

# host:port -> the tool's SQL_HOST and SQL_PORT; the password reaches it in SQL_PASSWORD, off the command line.
schema() {
  local what="$1" address="$2" user="$3" password="$4" database="$5"
  local start=$SECONDS
  SQL_PLUGIN=postgres12 SQL_HOST="${address%:*}" SQL_PORT="${address##*:}" SQL_USER="$user" \
    SQL_PASSWORD="$password" SQL_DATABASE="$database" SQL_TLS="${VSP_TEMPORAL_SQL_TLS:-false}" \
    SQL_TLS_CA_FILE="${VSP_TEMPORAL_SQL_TLS_CA_FILE:-}" bash -c '
      "$0" setup-schema -v 0.0 && "$0" update-schema --schema-name "$1"' \
    "$TEMPORAL_SQL_TOOL_BIN" "postgresql/v12/$what" >"$log" 2>&1 || {
    tail -n 20 "$log" >&2
    echo "temporal-schema: the $what schema in database $database at $address failed (above)" >&2
    exit 1
  }
  echo "temporal-schema: $what schema current in $database at $address ($((SECONDS - start)) s)"
}

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
address="${VSP_TEMPORAL_SQL_ADDRESS:-127.0.0.1:5432}"
schema temporal "$address" "$VSP_TEMPORAL_SQL_USER" "$VSP_TEMPORAL_SQL_PASSWORD" \
  "${VSP_TEMPORAL_SQL_DATABASE:-temporal}"
schema visibility "${VSP_TEMPORAL_VISIBILITY_SQL_ADDRESS:-$address}" \
  "${VSP_TEMPORAL_VISIBILITY_SQL_USER:-$VSP_TEMPORAL_SQL_USER}" \
  "${VSP_TEMPORAL_VISIBILITY_SQL_PASSWORD:-$VSP_TEMPORAL_SQL_PASSWORD}" \
  "${VSP_TEMPORAL_VISIBILITY_SQL_DATABASE:-temporal_visibility}"
