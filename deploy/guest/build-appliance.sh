#!/usr/bin/env bash
# Builds the VSP guest appliance from Debian packages, without root mounts: the Debian kernel (as shipped,
# for Xen and the pc machine, and unpacked to an ELF vmlinux that QEMU's microvm starts at its PVH entry: no
# decompression in the guest, which takes seconds under TCG), an uncompressed initramfs (static busybox, the
# virtio/ext4/Xen modules without their signatures, deploy/guest/init) and a busybox root disk (ext4
# made with mke2fs -d, stored as qcow2). Cached: the output goes to <outDir>/<version>/ where
# the version hashes the build inputs (this script, the init, the kernel and busybox versions), so a
# rebuild happens only when one of them changes. Prints the version folder on stdout.
# Usage: deploy/guest/build-appliance.sh [outDir]   (default: <repo>/.vsp/appliance)
# Environment: VSP_KERNEL_VERSION picks an installed kernel (default: the newest in /boot).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${1:-$ROOT/.vsp/appliance}"
INIT="$HERE/init"
STOP="$HERE/stop"
RESUME="$HERE/resume.c"
BUSYBOX=/bin/busybox
ROOT_DISK_SIZE=256M
# What the guest needs; modprobe adds their dependencies. crc32c is a soft dependency of ext4; virtio_mmio is
# the microvm machine's bus, virtio_pci the pc machine's; button and evdev let the init see the ACPI power
# button (graceful stop); xen-*front are the disks and NIC under Xen.
MODULES=(crc32c_generic virtio_mmio virtio_pci virtio_blk ext4 virtio_net button evdev xen-blkfront xen-netfront)

say() { echo "build-appliance: $*" >&2; }
die() {
  echo "build-appliance: ERROR: $*" >&2
  exit 1
}

for tool in mke2fs qemu-img cpio modprobe sha256sum od; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run deploy/setup.sh (Debian packages)"
done
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found: apt-get install busybox-static"
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked: apt-get install busybox-static"; fi

mkdir -p "$OUT"
WORK="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# The kernel: an installed one with its modules, else the current Debian package, unpacked.
KROOT=/
KVER="${VSP_KERNEL_VERSION:-}"
if [ -z "$KVER" ]; then
  for v in $(ls /boot 2>/dev/null | sed -n 's/^vmlinuz-//p' | sort -V); do
    [ -f "/lib/modules/$v/modules.dep" ] && KVER="$v"
  done
fi
if [ -z "$KVER" ]; then
  pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')"
  [ -n "$pkg" ] || die "no kernel in /boot and no linux-image-amd64 package known to apt"
  say "no kernel in /boot: unpacking $pkg"
  (cd "$WORK" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
  dpkg -x "$WORK"/"$pkg"_*.deb "$WORK/kernel"
  KROOT="$WORK/kernel"
  KVER="$(ls "$KROOT/lib/modules" | sort -V | tail -1)"
  depmod -b "$KROOT" "$KVER"
fi
VMLINUZ="$KROOT/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] || die "kernel $VMLINUZ not found"
[ -f "$KROOT/lib/modules/$KVER/modules.dep" ] || die "no modules for kernel $KVER under $KROOT/lib/modules"
BBVER="$("$BUSYBOX" | sed -n 1p)"

VERSION="$({ cat "$0" "$INIT" "$STOP" "$RESUME"; echo "$KVER"; echo "$BBVER"; } | sha256sum | cut -c1-16)"
DEST="$OUT/$VERSION"
if [ -f "$DEST/manifest.json" ]; then
  say "appliance $VERSION is up to date"
  echo "$DEST"
  exit 0
fi
say "building appliance $VERSION (kernel $KVER, $BBVER)"

# The kernel's ELF image, from the bzImage's payload (its offset and length are in the boot header), when the
# kernel has a PVH entry and a decompressor for its payload is here (a Xen dom0 needs none: Xen boots the
# bzImage). Prints nothing when it cannot.
unpack_vmlinux() {
  local bz=$1 out=$2 config setup offset length magic
  config="$KROOT/boot/config-$KVER"
  grep -qx 'CONFIG_PVH=y' "$config" 2>/dev/null || { say "no PVH entry in kernel $KVER ($config): no vmlinux"; return 0; }
  u32() { od -An -tu4 -j "$1" -N4 "$bz" | tr -d ' '; }
  setup=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
  [ "$setup" = 0 ] && setup=4
  offset=$(( (setup + 1) * 512 + $(u32 $((0x248))) ))
  length=$(u32 $((0x24c)))
  magic=$(od -An -tx1 -j "$offset" -N4 "$bz" | tr -d ' ')
  local unpack
  case "$magic" in
    fd377a58) unpack='xz -dc' ;;
    1f8b*) unpack='gzip -dc' ;;
    28b52ffd) unpack='zstd -qdc' ;;
    *) say "kernel $KVER: payload format $magic not known here: no vmlinux"; return 0 ;;
  esac
  command -v "${unpack%% *}" > /dev/null || { say "${unpack%% *} not found: no vmlinux"; return 0; }
  # The payload ends with its own size (4 bytes) that the decompressors read as trailing garbage.
  tail -c +$((offset + 1)) "$bz" | head -c "$length" | $unpack > "$out" 2>/dev/null || true
  [ "$(od -An -c -N4 "$out" | tr -d ' ')" = '177ELF' ] || die "cannot unpack the ELF kernel from $bz"
  echo vmlinux
}

# A module without the signature Debian appends (kernel/module/signing.c's layout: signature, a 12-byte
# header whose last 4 bytes are its length, the marker): the guest then skips hashing and checking each
# module, slow under TCG, and the initramfs is the host's to trust anyway (the kernel does not enforce
# signatures without Secure Boot).
unsign_module() {
  local ko=$1 size len
  local marker='~Module signature appended~'
  size=$(stat -c %s "$ko")
  [ "$(tail -c 28 "$ko" | head -c 27)" = "$marker" ] || return 0
  len=$(tail -c 32 "$ko" | od -An -tu1 -N4 | awk '{ print $1 * 16777216 + $2 * 65536 + $3 * 256 + $4 }')
  truncate -s $((size - 28 - 12 - len)) "$ko"
}

# initramfs
I="$WORK/initrd"
mkdir -p "$I"/{bin,dev,proc,sys,tmp,newroot,lib/mod}
cp "$BUSYBOX" "$I/bin/busybox"
cp "$INIT" "$I/init"
cp "$STOP" "$I/bin/vsp-stop"
# The snapshot restore's start message (clock, entropy): static, as the initramfs has no libc. Only QEMU
# hosts restore snapshots; where no compiler is (a Xen dom0), the appliance has no helper and a QEMU VM
# built from it boots instead (its snapshot build fails, once, with "vsp-resume: not found").
if command -v cc > /dev/null 2>&1; then
  cc -static -Os -s -Wall -Werror -o "$I/bin/vsp-resume" "$RESUME" || die "cannot compile $RESUME (apt-get install gcc libc6-dev)"
else
  say "no C compiler: no snapshot helper in this appliance (QEMU VMs will boot, not restore)"
fi
chmod 755 "$I/init"
: > "$I/lib/mod/order"
for m in "${MODULES[@]}"; do
  # Lines "insmod <path>" in load order; built-in modules print "builtin <name>" and need nothing.
  modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }' | while read -r ko; do
    [ -f "$ko" ] || ko="$KROOT/$ko"
    name="$(basename "$ko" | sed -E 's/\.ko(\.(xz|zst|gz))?$//')"
    grep -qx "$name" "$I/lib/mod/order" && continue
    case "$ko" in
      *.ko.xz) xz -dc "$ko" > "$I/lib/mod/$name.ko" ;;
      *.ko.zst) zstd -qdc "$ko" > "$I/lib/mod/$name.ko" ;;
      *.ko.gz) gzip -dc "$ko" > "$I/lib/mod/$name.ko" ;;
      *.ko) cp "$ko" "$I/lib/mod/$name.ko" ;;
      *) die "unexpected module file $ko" ;;
    esac
    unsign_module "$I/lib/mod/$name.ko"
    echo "$name" >> "$I/lib/mod/order"
  done
done
grep -qx virtio_blk "$I/lib/mod/order" || modprobe -d "$KROOT" -S "$KVER" --show-depends virtio_blk | grep -q builtin ||
  die "virtio_blk module not found for kernel $KVER"
say "modules: $(tr '\n' ' ' < "$I/lib/mod/order")"

mkdir -p "$WORK/out"
# Uncompressed: unpacking a gzip initramfs costs the guest more under TCG than loading the bytes costs QEMU.
(cd "$I" && find . | sort | cpio -o -H newc --quiet -R 0:0) > "$WORK/out/initrd.cpio"
cp "$VMLINUZ" "$WORK/out/vmlinuz"
VMLINUX="$(unpack_vmlinux "$VMLINUZ" "$WORK/out/vmlinux")"

# Root disk: a busybox system; the init adds the owner's account at boot.
R="$WORK/rootfs"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,home,root,var/tmp,tmp}
chmod 1777 "$R/tmp" "$R/var/tmp"
cp "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$R/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\n' > "$R/etc/group"
echo vsp > "$R/etc/hostname"
mke2fs -q -t ext4 -L vsp-root -E root_owner=0:0 -d "$R" "$WORK/root.raw" "$ROOT_DISK_SIZE" >&2
qemu-img convert -f raw -O qcow2 "$WORK/root.raw" "$WORK/out/root.qcow2"
ROOT_SHA="$(sha256sum "$WORK/out/root.qcow2" | cut -d' ' -f1)"

cat > "$WORK/out/manifest.json" << EOF
{
  "version": "$VERSION",
  "kernelVersion": "$KVER",
  "busyboxVersion": "$BBVER",
  "files": {
    "vmlinuz": "vmlinuz",
    "vmlinux": "$VMLINUX",
    "initrd": "initrd.cpio",
    "root": { "path": "root.qcow2", "sha256": "$ROOT_SHA", "format": "qcow2" }
  }
}
EOF
sync -f "$WORK/out/manifest.json"
# Atomic publish: a concurrent build of the same version loses the rename and keeps the winner's.
rm -rf "$DEST.tmp.$$"
mv "$WORK/out" "$DEST.tmp.$$"
mv -T "$DEST.tmp.$$" "$DEST" 2>/dev/null || rm -rf "$DEST.tmp.$$"
say "appliance ready in $DEST"
echo "$DEST"
