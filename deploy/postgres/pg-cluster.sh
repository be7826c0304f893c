#!/usr/bin/env bash
# A private PostgreSQL cluster in one directory (Debian's postgresql package), for tests and the dev
# machine: the repository's `cluster` backend and Temporal on PostgreSQL (deploy/temporal/) use it. A
# provider runs its own PostgreSQL instead and gives its URL in the settings.
#
#   pg-cluster.sh init DIR [--port N] [--no-fsync]   create the cluster (once; later calls change nothing)
#   pg-cluster.sh start DIR [--port N] [--no-fsync]  init if needed, then start it in the background
#   pg-cluster.sh run DIR                             run it in the foreground (tests, supervisors)
#   pg-cluster.sh stop DIR                            stop it (fast shutdown); nothing when not running
#   pg-cluster.sh createdb DIR NAME [OWNER]           create database NAME (and role OWNER, default NAME),
#                                                     once; prints its URL
#   pg-cluster.sh dropdb DIR NAME                     drop database NAME, closing its connections
#   pg-cluster.sh url DIR NAME [OWNER]                print the URL of database NAME as OWNER
#   pg-cluster.sh port DIR                            print the cluster's TCP port
#
# DIR is the data directory. The server listens on 127.0.0.1:PORT (default 55432) and on a unix socket in
# DIR. Over TCP every role logs in with a password (scram-sha-256): each database's owner role gets a random
# one, kept in DIR/vsp-passwords/ROLE (mode 0600); the superuser has no TCP login at all. The unix socket
# (trusted) is reachable only by the cluster's OS user and root, as DIR is mode 0700. Run as root, the
# cluster runs as the `postgres` user (PostgreSQL refuses root); otherwise as the calling user.
# --no-fsync trades crash safety of the machine for speed: for throw-away test clusters only.
set -euo pipefail

DEFAULT_PORT=55432
# Temporal's services and several repository servers each keep a pool of connections.
MAX_CONNECTIONS=300

die() {
  echo "pg-cluster: ERROR: $*" >&2
  exit 1
}
usage() {
  sed -n '6,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

pg_bin() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$dir" ] && [ -x "$dir/initdb" ] || die "PostgreSQL server binaries not found under /usr/lib/postgresql: install Debian's postgresql package (deploy/setup.sh does)"
  echo "$dir"
}
PG_BIN="$(pg_bin)"

# Commands on the cluster run as its OS user.
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "user postgres missing: install Debian's postgresql package"
  as_owner() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
  OWNER_USER=postgres
else
  as_owner() { "$@"; }
  OWNER_USER="$(id -un)"
fi

[ $# -ge 2 ] || usage
cmd="$1"
DIR="$2"
shift 2
case "$DIR" in
  /*) ;;
  *) DIR="$(pwd)/$DIR" ;;
esac

port_of() {
  sed -n "s/^port = \([0-9]*\).*/\1/p" "$DIR/postgresql.conf" | tail -n 1
}
is_cluster() { [ -f "$DIR/PG_VERSION" ]; }
require_cluster() { is_cluster || die "no cluster in $DIR (run: $0 init $DIR)"; }
socket_args() { echo "-h $DIR -p $(port_of) -U postgres"; }
is_running() { as_owner "$PG_BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; }

# A role or database name: PostgreSQL identifiers kept to what needs no quoting.
valid_name() {
  [[ "$1" =~ ^[a-z_][a-z0-9_]{0,62}$ ]] || die "$2 '$1' is not a valid name (lowercase letters, digits, _; at most 63; not starting with a digit)"
}

cmd_init() {
  local port="" fsync=on
  while [ $# -gt 0 ]; do
    case "$1" in
      --port)
        port="${2:-}"
        shift 2 || die "--port needs a value"
        ;;
      --no-fsync)
        fsync=off
        shift
        ;;
      *) die "unknown option '$1'" ;;
    esac
  done
  if is_cluster; then
    [ -z "$port" ] || [ "$port" = "$(port_of)" ] || die "cluster in $DIR listens on port $(port_of), not $port"
    return
  fi
  port="${port:-$DEFAULT_PORT}"
  [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "--port must be 1-65535, got '$port'"
  if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then die "$DIR exists and is not empty, and holds no cluster"; fi
  mkdir -p "$DIR"
  chown "$OWNER_USER" "$DIR"
  chmod 0700 "$DIR"
  as_owner test -w "$DIR" || die "user $OWNER_USER cannot reach $DIR (a parent directory is closed to it)"
  # No superuser password: it never logs in over TCP.
  as_owner "$PG_BIN/initdb" -D "$DIR" -U postgres --auth-local=trust --auth-host=reject -E UTF8 \
    --locale=C.UTF-8 >"$DIR.initdb.log" 2>&1 || {
    cat "$DIR.initdb.log" >&2
    die "initdb failed in $DIR"
  }
  rm -f "$DIR.initdb.log"
  cat >>"$DIR/postgresql.conf" <<EOF

# VSP (deploy/postgres/pg-cluster.sh)
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
max_connections = $MAX_CONNECTIONS
fsync = $fsync
synchronous_commit = $fsync
full_page_writes = $fsync
logging_collector = off
EOF
  cat >"$DIR/pg_hba.conf" <<EOF
# VSP (deploy/postgres/pg-cluster.sh): socket for the cluster's OS user; roles by password on loopback
# (each database is closed to PUBLIC: only its owner connects).
local all all trust
host all all 127.0.0.1/32 scram-sha-256
EOF
  as_owner mkdir -m 0700 "$DIR/vsp-passwords"
  echo "pg-cluster: created cluster in $DIR (port $port, fsync $fsync)"
}

cmd_start() {
  cmd_init "$@"
  if is_running; then return; fi
  as_owner "$PG_BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w -t 60 start >/dev/null ||
    die "PostgreSQL did not start; last lines of $DIR/server.log:
$(tail -n 20 "$DIR/server.log")"
  echo "pg-cluster: running in $DIR on 127.0.0.1:$(port_of)"
}

cmd_run() {
  require_cluster
  if [ "$(id -u)" = 0 ]; then exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$PG_BIN/postgres" -D "$DIR"; fi
  exec "$PG_BIN/postgres" -D "$DIR"
}

cmd_stop() {
  is_cluster || return 0
  is_running || return 0
  as_owner "$PG_BIN/pg_ctl" -D "$DIR" -m fast -w -t 60 stop >/dev/null
}

password_of() {
  local file="$DIR/vsp-passwords/$1"
  [ -f "$file" ] || die "no role $1 made by this script in $DIR (run: $0 createdb $DIR <database> $1)"
  cat "$file"
}

# Sets NAME and OWNER from the arguments "NAME [OWNER]" (OWNER defaults to NAME), both checked.
db_and_owner() {
  { [ $# -ge 1 ] && [ $# -le 2 ]; } || usage
  require_cluster
  NAME="$1"
  OWNER="${2:-$1}"
  valid_name "$NAME" "database"
  valid_name "$OWNER" "role"
}

cmd_url() {
  db_and_owner "$@"
  echo "postgres://$OWNER:$(password_of "$OWNER")@127.0.0.1:$(port_of)/$NAME"
}

# Runs the SQL on stdin as the superuser, over the socket; -v name=value sets psql variables.
psql_su() {
  # shellcheck disable=SC2046 # socket_args is a list of words
  as_owner "$PG_BIN/psql" $(socket_args) -d postgres -v ON_ERROR_STOP=1 -qtA "$@" -f -
}

cmd_createdb() {
  db_and_owner "$@"
  is_running || die "the cluster in $DIR is not running (run: $0 start $DIR)"
  local pwfile="$DIR/vsp-passwords/$OWNER"
  if [ ! -f "$pwfile" ]; then
    local password
    password="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    # The password reaches psql in its environment, never on a command line.
    VSP_PG_PASSWORD="$password" psql_su -v role="$OWNER" >/dev/null <<'SQL'
\getenv pw VSP_PG_PASSWORD
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'role', :'pw') \gexec
SQL
    printf '%s' "$password" | as_owner tee "$pwfile.tmp" >/dev/null
    as_owner chmod 0600 "$pwfile.tmp"
    as_owner mv "$pwfile.tmp" "$pwfile"
  fi
  psql_su -v db="$NAME" -v owner="$OWNER" >/dev/null <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SELECT format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', :'db') \gexec
SQL
  cmd_url "$NAME" "$OWNER"
}

cmd_dropdb() {
  [ $# -eq 1 ] || usage
  require_cluster
  valid_name "$1" "database"
  is_running || die "the cluster in $DIR is not running (run: $0 start $DIR)"
  psql_su -v db="$1" >/dev/null <<'SQL'
SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', :'db') \gexec
SQL
}

case "$cmd" in
  init) cmd_init "$@" ;;
  start) cmd_start "$@" ;;
  run) cmd_run "$@" ;;
  stop) cmd_stop "$@" ;;
  createdb) cmd_createdb "$@" ;;
  dropdb) cmd_dropdb "$@" ;;
  url) cmd_url "$@" ;;
  port)
    require_cluster
    port_of
    ;;
  *) usage ;;
esac
