#!/usr/bin/env bash
# `npm test` (and so `.ci/run`): checks, build, then the test tiers, the cluster tier (real Xen dom0s) last.
# The cluster tier needs root (as the system tier does); VSP_TEST_CLUSTER=0 leaves it out (a developer's
# quick run), and without root it is left out with a note.
# The cluster tier's dom0 image (mmdebstrap: mostly downloading and unpacking packages, little CPU) builds
# in the background while the unit, integration and system tiers run, so a fresh machine does not wait for
# it afterwards; the dom0s themselves boot only in the cluster tier, never beside the QEMU tests.
# The scale tier's Go servers (deploy/go-tools.sh: SeaweedFS, the Temporal server; cached once built) build
# the same way, at a lower priority, and the scale tier runs after the system tier; VSP_TEST_SCALE=0 leaves
# it out.
# Each phase's duration goes to stderr as `all-tiers: <phase> <seconds> s`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

phase_start=$SECONDS
phase() {
  echo "all-tiers: $1 $((SECONDS - phase_start)) s" >&2
  phase_start=$SECONDS
}

# Background builds run in process groups of their own (job control), so stopping one ends all of it
# (mmdebstrap, go build).
stop_group() {
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then kill -- "-$1" 2>/dev/null || true; fi
}
# start_background LOG COMMAND...: runs the command in the background, its output in LOG; sets bg_pid.
start_background() {
  local log=$1
  shift
  mkdir -p .vsp/test-logs
  set -m
  "$@" >"$log" 2>&1 &
  bg_pid=$!
  set +m
}
# await_background PID LOG WHAT: waits for a background build; on failure shows its log's end.
await_background() {
  if ! wait "$1"; then
    echo "all-tiers: building $3 failed (log: $2):" >&2
    tail -n 40 "$2" >&2
    return 1
  fi
}
image_pid=""
image_log=".vsp/test-logs/dom0-image-$$.log"
tools_pid=""
tools_log=".vsp/test-logs/go-tools-$$.log"
trap 'stop_group "$image_pid"; stop_group "$tools_pid"' EXIT
scale=0
if [ "${VSP_TEST_SCALE:-1}" != 0 ]; then
  # Its PostgreSQL clusters run as the postgres user, which takes root to arrange.
  if [ "$(id -u)" = 0 ]; then scale=1; else echo "all-tiers: not root, so no scale tier (PostgreSQL, S3, Temporal on PostgreSQL)" >&2; fi
fi
if [ "$scale" = 1 ]; then
  start_background "$tools_log" nice -n 15 bash deploy/go-tools.sh
  tools_pid=$bg_pid
fi

npm run lint
npm run typecheck
npm run build
phase checks+build

cluster=0
if [ "${VSP_TEST_CLUSTER:-1}" != 0 ]; then
  if [ "$(id -u)" = 0 ]; then cluster=1; else echo "all-tiers: not root, so no cluster tier (real Xen dom0s)" >&2; fi
fi

if [ "$cluster" = 1 ]; then
  start_background "$image_log" node dist/deploy/vmcluster/main.js image
  image_pid=$bg_pid
fi

npx jest -c jest.unit.config.js
phase unit
npx jest --runInBand --forceExit --selectProjects integration system
phase integration+system

if [ "$scale" = 1 ]; then
  await_background "$tools_pid" "$tools_log" "the scale tier's Go servers" || exit 1
  tools_pid=""
  phase "waiting for the Go servers"
  npx jest --runInBand --forceExit --selectProjects scale
  phase scale
fi

if [ -n "$image_pid" ]; then
  await_background "$image_pid" "$image_log" "the dom0 image" || exit 1
  image_pid=""
  phase "waiting for the dom0 image"
fi
if [ "$cluster" = 1 ]; then
  npx jest --runInBand --forceExit --selectProjects cluster
  phase cluster
fi
