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

image_pid=""
image_log=".vsp/test-logs/dom0-image-$$.log"
stop_image() {
  # The build runs in a process group of its own (job control below): end all of it, mmdebstrap included.
  if [ -n "$image_pid" ] && kill -0 "$image_pid" 2>/dev/null; then kill -- "-$image_pid" 2>/dev/null || true; fi
}
tools_pid=""
tools_log=".vsp/test-logs/go-tools-$$.log"
stop_background() {
  stop_image
  if [ -n "$tools_pid" ] && kill -0 "$tools_pid" 2>/dev/null; then kill -- "-$tools_pid" 2>/dev/null || true; fi
}
trap stop_background EXIT
scale=0
if [ "${VSP_TEST_SCALE:-1}" != 0 ]; then
  # Its PostgreSQL clusters run as the postgres user, which takes root to arrange.
  if [ "$(id -u)" = 0 ]; then scale=1; else echo "all-tiers: not root, so no scale tier (PostgreSQL, S3, Temporal on PostgreSQL)" >&2; fi
fi
if [ "$scale" = 1 ]; then
  mkdir -p .vsp/test-logs
  set -m
  nice -n 15 bash deploy/go-tools.sh >"$tools_log" 2>&1 &
  tools_pid=$!
  set +m
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
  mkdir -p .vsp/test-logs
  set -m
  node dist/deploy/vmcluster/main.js image >"$image_log" 2>&1 &
  image_pid=$!
  set +m
fi

npx jest -c jest.unit.config.js
phase unit
npx jest --runInBand --forceExit --selectProjects integration system
phase integration+system

if [ "$scale" = 1 ]; then
  if ! wait "$tools_pid"; then
    tools_pid=""
    echo "all-tiers: building the scale tier's Go servers failed (log: $tools_log):" >&2
    tail -n 40 "$tools_log" >&2
    exit 1
  fi
  tools_pid=""
  phase "waiting for the Go servers"
  npx jest --runInBand --forceExit --selectProjects scale
  phase scale
fi

if [ -n "$image_pid" ]; then
  if ! wait "$image_pid"; then
    image_pid=""
    echo "all-tiers: building the dom0 image failed (log: $image_log):" >&2
    tail -n 40 "$image_log" >&2
    exit 1
  fi
  image_pid=""
  phase "waiting for the dom0 image"
fi
if [ "$cluster" = 1 ]; then
  npx jest --runInBand --forceExit --selectProjects cluster
  phase cluster
fi
