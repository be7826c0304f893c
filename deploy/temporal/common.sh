# Sourced by deploy/temporal/*.sh: the Temporal version VSP runs and where its binaries are cached.
# VSP_GO_CACHE moves the cache (default /var/cache/vsp/go, outside the repository, shared by worktrees).
TEMPORAL_VERSION=v1.29.2
GO_CACHE="${VSP_GO_CACHE:-/var/cache/vsp/go}"
TEMPORAL_SERVER_BIN="$GO_CACHE/temporal-server-$TEMPORAL_VERSION"
TEMPORAL_SQL_TOOL_BIN="$GO_CACHE/temporal-sql-tool-$TEMPORAL_VERSION"

# Fails, saying how to build them, when the binaries are not there.
require_temporal_built() {
  if [ ! -x "$TEMPORAL_SERVER_BIN" ] || [ ! -x "$TEMPORAL_SQL_TOOL_BIN" ]; then
    echo "temporal: $TEMPORAL_SERVER_BIN or $TEMPORAL_SQL_TOOL_BIN missing: build them with deploy/temporal/build.sh (about 11 minutes)" >&2
    exit 1
  fi
}

# Fails naming the setting when a required one is empty.
require_setting() {
  if [ -z "${!1:-}" ]; then
    echo "temporal: $1 is not set ($2)" >&2
    exit 1
  fi
}

# What both schema.sh and server.sh need: the binaries and PostgreSQL's role (config/vsp.yaml).
require_binaries_and_role() {
  require_temporal_built
  require_setting VSP_TEMPORAL_SQL_USER "the PostgreSQL role Temporal logs in as"
  require_setting VSP_TEMPORAL_SQL_PASSWORD "that role's password"
}
