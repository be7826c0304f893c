import { promises as fs } from 'node:fs';
import { VSP_DIR, writeDataDiskFile } from '../storage/diskImageStaging';
import type { VmPaths } from '../storage/vmStore';
import { runCommand } from './qemu/runCommand';

/** The disks every VM driver boots a task from: a root overlay of the base image and the data disk. */

const QEMU_IMG_TIMEOUT_MS = 30_000;

/**
 * The VM's root disk: a qcow2 overlay of the cached base image, which records its backing file as
 * `backingName` (default: `base` itself; the Xen driver names it by its mounted path). Kept if present.
 */
export async function createRootOverlay(base: string, rootDisk: string, backingName = base): Promise<void> {
  if (
    await fs.access(rootDisk).then(
      () => true,
      () => false,
    )
  )
    return;
  const info = await runCommand('qemu-img', ['info', '--output=json', base], {
    timeoutMs: QEMU_IMG_TIMEOUT_MS,
  });
  const format = (JSON.parse(info.stdout) as { format: string }).format;
  const tmp = `${rootDisk}.${process.pid}.tmp`;
  await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', backingName, '-F', format, tmp], {
    timeoutMs: QEMU_IMG_TIMEOUT_MS,
  });
  await fs.rename(tmp, rootDisk);
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
