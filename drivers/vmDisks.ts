import { promises as fs } from 'node:fs';
import { VSP_DIR, writeDataDiskFile } from '../storage/diskImageStaging';
import type { VmPaths } from '../storage/vmStore';
import { runCommand } from '../lib/runCommand';
import { pathExists } from '../lib/pathExists';

/** The disks every VM driver boots a task from: a root overlay of the base image and the data disk. */

const QEMU_IMG_TIMEOUT_MS = 30_000;

/** Builds `rootDisk` with `make(tmp)` into a temporary file renamed into place; kept if present. */
async function buildRootDisk(rootDisk: string, make: (tmp: string) => Promise<unknown>): Promise<void> {
  if (await pathExists(rootDisk)) return;
  const tmp = `${rootDisk}.${process.pid}.tmp`;
  await make(tmp);
  await fs.rename(tmp, rootDisk);
}

/** The VM's root disk under QEMU: a qcow2 overlay of the cached base image. */
export function createRootOverlay(base: string, rootDisk: string): Promise<void> {
  return buildRootDisk(rootDisk, async (tmp) => {
    const info = await runCommand('qemu-img', ['info', '--output=json', base], {
      timeoutMs: QEMU_IMG_TIMEOUT_MS,
    });
    const format = (JSON.parse(info.stdout) as { format: string }).format;
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', format, tmp], {
      timeoutMs: QEMU_IMG_TIMEOUT_MS,
    });
  });
}

/**
 * The VM's root disk under Xen: a sparse raw copy of the base image (the appliance root is a few MB in a
 * 256 MiB image), for the kernel's blkback, which reads raw files only, and with no backing file to reach
 * from the other hosts.
 */
export function createRawRoot(base: string, rootDisk: string): Promise<void> {
  // qemu-img writes zeroes as holes: the copy takes the base's used blocks only.
  return buildRootDisk(rootDisk, (tmp) =>
    runCommand('qemu-img', ['convert', '-q', '-O', 'raw', base, tmp], { timeoutMs: QEMU_IMG_TIMEOUT_MS }),
  );
}

/** Puts the task's command on the data disk, where the guest init runs it from. */
export function writeTaskCommand(paths: VmPaths, command: string): Promise<void> {
  const line = command.endsWith('\n') ? command : `${command}\n`;
  return writeDataDiskFile(paths.dataDisk, `${VSP_DIR}/command`, line, paths.dir);
}

/** A missing data disk means the inputs were never staged: say so instead of booting without a home. */
export async function requireDataDisk(vmId: string, dataDisk: string): Promise<void> {
  await fs.access(dataDisk).catch((err: unknown) => {
    throw new Error(`VM ${vmId}: data disk ${dataDisk} is missing: stage the inputs first`, { cause: err });
  });
}
