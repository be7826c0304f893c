import { promises as fs } from 'node:fs';
import path from 'node:path';
import { runCommand } from '../../lib/runCommand';
import { writeFileAtomic } from '../../storage/durableFile';

/**
 * The block devices of a Xen domain's disks. libxl gives a disk's hotplug script 10 s, which Xen's stock
 * `block` script (a lock, a sharing check over every device, losetup) misses on a busy dom0, at a
 * migration's target too. So the driver attaches each raw disk file to a loop device itself, with no time
 * limit, before the domain is built (on the source at start, on the target in prepareIncoming), and names
 * it by a link that is the same on every host (`<dir>/<vmId>/root|data`): the domain config, which travels
 * with the migrated domain, names the links. The hotplug script (`/etc/xen/scripts/vsp-block`, written by
 * the driver) then only tells blkback which device the link names. The loop devices use direct I/O: no
 * dom0 page cache holds a disk's blocks, so the host a VM left has nothing of it to write back later.
 */

export type DiskKind = 'root' | 'data';
export type DiskFiles = Record<DiskKind, string>;

/** Attaches a file to a free loop device and returns the device; detaches a device. */
export interface LoopControl {
  attach(file: string): Promise<string>;
  detach(device: string): Promise<void>;
  /** The file a device is attached to, or undefined when it is free. */
  backingFile(device: string): Promise<string | undefined>;
}

const LOSETUP_TIMEOUT_MS = 120_000;

export const losetup: LoopControl = {
  async attach(file) {
    const r = await runCommand('losetup', ['--find', '--show', '--direct-io=on', file], {
      timeoutMs: LOSETUP_TIMEOUT_MS,
    });
    return r.stdout.trim();
  },
  async detach(device) {
    await runCommand('losetup', ['--detach', device], { timeoutMs: LOSETUP_TIMEOUT_MS });
  },
  async backingFile(device) {
    const r = await runCommand('losetup', ['--list', '--noheadings', '--output', 'BACK-FILE', device], {
      timeoutMs: LOSETUP_TIMEOUT_MS,
    }).catch(() => undefined);
    return r?.stdout.trim() || undefined;
  },
};

/** blkback's device for the link libxl passes as `params`; nothing to undo on remove (the driver detaches). */
const HOTPLUG_SCRIPT = `#!/bin/sh
# Written by the VSP host worker (drivers/xen/loopDisks.ts): xl's hotplug script for VSP's disks. The
# driver attached the disk to a loop device and named it by a link before the domain was built.
[ "$1" = add ] || exit 0
dev=$(readlink -f "$(xenstore-read "$XENBUS_PATH/params")")
if [ -b "$dev" ]; then
  exec xenstore-write "$XENBUS_PATH/physical-device" "$(stat -L -c %t:%T "$dev")" \\
    "$XENBUS_PATH/physical-device-path" "$dev" "$XENBUS_PATH/hotplug-status" connected
fi
xenstore-write "$XENBUS_PATH/hotplug-error" "VSP disk link names no block device: $dev" \\
  "$XENBUS_PATH/hotplug-status" error
exit 1
`;

export const DEFAULT_LOOP_DISK_DIR = '/run/vsp/xen';
/** Where xl's hotplug scripts live (/run is mounted noexec). */
export const XEN_SCRIPT_DIR = '/etc/xen/scripts';

export class LoopDisks {
  constructor(
    readonly dir = DEFAULT_LOOP_DISK_DIR,
    private readonly loop: LoopControl = losetup,
    private readonly scriptDir = XEN_SCRIPT_DIR,
  ) {}

  /** The hotplug script the domain configs name. */
  get script(): string {
    return path.join(this.scriptDir, 'vsp-block');
  }

  /** Writes the hotplug script if it is missing or old (/run is empty after a reboot). */
  async install(): Promise<void> {
    const current = await fs.readFile(this.script, 'utf8').catch(() => undefined);
    if (current === HOTPLUG_SCRIPT) return;
    await fs.mkdir(this.scriptDir, { recursive: true });
    await writeFileAtomic(this.script, HOTPLUG_SCRIPT, 0o755);
  }

  private link(vmId: string, kind: DiskKind): string {
    return path.join(this.dir, vmId, kind);
  }

  /** Attaches the VM's disk files (kept when already attached to them); returns the links. */
  async attach(vmId: string, files: DiskFiles): Promise<DiskFiles> {
    await this.install();
    await fs.mkdir(path.join(this.dir, vmId), { recursive: true, mode: 0o700 });
    const links = {} as DiskFiles;
    for (const kind of ['root', 'data'] as const) {
      const link = this.link(vmId, kind);
      const device = await fs.readlink(link).catch(() => undefined);
      if (!device || (await this.loop.backingFile(device)) !== files[kind]) {
        const attached = await this.loop.attach(files[kind]);
        const tmp = `${link}.${process.pid}.tmp`;
        await fs.rm(tmp, { force: true });
        await fs.symlink(attached, tmp);
        await fs.rename(tmp, link);
      }
      links[kind] = link;
    }
    return links;
  }

  /** Detaches the VM's loop devices (once its domain is gone from this host) and drops the links. */
  async detach(vmId: string): Promise<void> {
    for (const kind of ['root', 'data'] as const) {
      const device = await fs.readlink(this.link(vmId, kind)).catch(() => undefined);
      if (device && (await this.loop.backingFile(device)) !== undefined) await this.loop.detach(device);
    }
    await fs.rm(path.join(this.dir, vmId), { recursive: true, force: true });
  }
}
