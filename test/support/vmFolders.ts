import { promises as fs } from 'node:fs';
import path from 'node:path';
import { until } from './clusterFixture';

/**
 * The store folder and VM id of a task's VM, if its folder is in one of `storeDirs` now: a VM folder is
 * named after its task and run (`<task id>-<run>`), while the results folder is the task's alone.
 */
export async function vmFolderOf(
  storeDirs: string[],
  taskId: string,
): Promise<{ storeDir: string; vmId: string } | undefined> {
  for (const storeDir of storeDirs) {
    const vms = await fs.readdir(path.join(storeDir, 'vms')).catch(() => [] as string[]);
    const vmId = vms.find((d) => d.startsWith(`${taskId}-`));
    if (vmId) return { storeDir, vmId };
  }
  return undefined;
}

/** The VM id of a task, once its folder exists in one of `storeDirs`. */
export async function findVmId(storeDirs: string[], taskId: string): Promise<string> {
  return until(`the VM folder of ${taskId}`, async () => (await vmFolderOf(storeDirs, taskId))?.vmId);
}
