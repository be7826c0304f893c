#!/usr/bin/env bash
# Builds the dom0 disk image of the virtual Xen cluster from Debian packages, without booting anything and
# without mounts: mmdebstrap (bookworm, Xen 4.17, systemd, sshd, kernel NFS) into a folder, the overlay and
# keys copied in, then `mkfs.ext4 -d` and `qemu-img convert`. deploy/vmcluster/image.ts runs it into a
# fresh folder and keys the result by a hash of its inputs (this script, the overlay, the keys, node).
# Usage: build-image.sh OUT_DIR KEYS_DIR NODE_BINARY
#   KEYS_DIR holds id_ed25519.pub (root's authorized key), id_ed25519 (root's key, for dom0 -> dom0 ssh:
#   `xl migrate`) and hostkeys/<host>/ssh_host_ed25519_key{,.pub} (fixed host keys, one pair per host).
# Output: OUT_DIR/dom0.qcow2 (ext4, whole disk), OUT_DIR/boot/{xen,vmlinuz,initrd.img}, OUT_DIR/packages.txt
# Needs root, mmdebstrap, e2fsprogs, qemu-utils and the Debian mirror of this machine's apt sources.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:?usage: build-image.sh OUT_DIR KEYS_DIR NODE_BINARY}"
KEYS="${2:?usage: build-image.sh OUT_DIR KEYS_DIR NODE_BINARY}"
NODE_BIN="${3:?usage: build-image.sh OUT_DIR KEYS_DIR NODE_BINARY}"
# Free space on the dom0's disk beyond the packages: guest disks, the host worker's store, logs.
HEADROOM_MB=6144

PACKAGES=(
  systemd systemd-sysv udev dbus kmod procps less iputils-ping iproute2 bridge-utils
  linux-image-amd64 initramfs-tools
  xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils qemu-system-xen
  openssh-server openssh-sftp-server openssh-client
  nfs-kernel-server nfs-common rpcbind
  e2fsprogs qemu-utils busybox-static cpio libstdc++6 rsync
)

say() { echo "build-image: $*" >&2; }
die() {
  echo "build-image: ERROR: $*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap --mode=root)"
for tool in mmdebstrap mkfs.ext4 qemu-img; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run deploy/setup.sh"
done
[ -f "$KEYS/id_ed25519.pub" ] && [ -f "$KEYS/id_ed25519" ] || die "no cluster key in $KEYS"
[ -d "$KEYS/hostkeys" ] || die "no host keys in $KEYS/hostkeys"
[ -x "$NODE_BIN" ] || die "node binary $NODE_BIN is not executable"

# The mirrors this machine's apt already uses (URIs of deb822 sources and one-line entries, not comments).
sources="$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -E '^[[:space:]]*(URIs:|deb )' || true)"
MIRROR="${VSP_DEBIAN_MIRROR:-$(printf '%s\n' "$sources" | grep -oE 'https?://[^ ]+/debian/?' | head -1)}"
SECMIRROR="${VSP_DEBIAN_SECURITY_MIRROR:-$(printf '%s\n' "$sources" | grep -oE 'https?://[^ ]+/debian-security/?' | head -1)}"
[ -n "$MIRROR" ] && [ -n "$SECMIRROR" ] ||
  die "no Debian mirror in the apt sources: set VSP_DEBIAN_MIRROR and VSP_DEBIAN_SECURITY_MIRROR"

ROOTFS="$OUT/rootfs"
mkdir -p "$OUT/boot"
rm -rf "$ROOTFS"
t0=$(date +%s)
say "mmdebstrap bookworm from $MIRROR (${#PACKAGES[@]} packages and their dependencies)"
# Hooks run on the host with the root folder as $1. force-unsafe-io: no fsync per package (a failed build
# is thrown away whole).
mmdebstrap --mode=root --variant=minbase --quiet --dpkgopt=force-unsafe-io \
  --aptopt='Apt::Install-Recommends "false"' \
  --include="$(
    IFS=,
    echo "${PACKAGES[*]}"
  )" \
  --customize-hook='cp -a '"$HERE"'/overlay/. "$1"/' \
  --customize-hook='install -m 0755 '"$NODE_BIN"' "$1"/usr/local/bin/node' \
  --customize-hook='mkdir -p "$1"/etc/vsp/hostkeys && cp -a '"$KEYS"'/hostkeys/. "$1"/etc/vsp/hostkeys/ && chmod -R go-rwx "$1"/etc/vsp/hostkeys' \
  --customize-hook='install -d -m 0700 "$1"/root/.ssh && install -m 0600 '"$KEYS"'/id_ed25519 "$1"/root/.ssh/id_ed25519 && install -m 0644 '"$KEYS"'/id_ed25519.pub "$1"/root/.ssh/id_ed25519.pub && install -m 0600 '"$KEYS"'/id_ed25519.pub "$1"/root/.ssh/authorized_keys' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service vsp-dom0-setup.service vsp-dom0-ready.service' \
  --customize-hook='chroot "$1" systemctl mask systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer' \
  --customize-hook=': > "$1"/etc/machine-id; rm -f "$1"/var/lib/dbus/machine-id' \
  --customize-hook='chroot "$1" dpkg-query -W -f "\${Package} \${Version}\n" > '"$OUT"'/packages.txt' \
  bookworm "$ROOTFS" \
  "deb $MIRROR bookworm main" \
  "deb $MIRROR bookworm-updates main" \
  "deb $SECMIRROR bookworm-security main"
t1=$(date +%s)
say "mmdebstrap took $((t1 - t0)) s"

KVER="$(ls "$ROOTFS/lib/modules" | sort -V | tail -1)"
cp "$ROOTFS/boot/vmlinuz-$KVER" "$OUT/boot/vmlinuz"
cp "$ROOTFS/boot/initrd.img-$KVER" "$OUT/boot/initrd.img"
zcat "$ROOTFS"/boot/xen-4.17-amd64.gz >"$OUT/boot/xen"

used_mb="$(du -sm "$ROOTFS" | cut -f1)"
size_mb=$((used_mb + HEADROOM_MB))
rm -f "$OUT/dom0.raw"
# Inode tables and journal written now (zeros, dropped by the convert), not by the dom0 at first boot.
mkfs.ext4 -q -F -L vsp-dom0 -E lazy_itable_init=0,lazy_journal_init=0 -d "$ROOTFS" "$OUT/dom0.raw" "${size_mb}M"
qemu-img convert -f raw -O qcow2 "$OUT/dom0.raw" "$OUT/dom0.qcow2"
rm -rf "$OUT/dom0.raw" "$ROOTFS"
t2=$(date +%s)
say "image: ${used_mb} MiB of packages on a ${size_mb} MiB ext4, qcow2 $(du -m "$OUT/dom0.qcow2" | cut -f1) MiB, kernel $KVER; total $((t2 - t0)) s"
