import { promises as fs } from 'node:fs';
import path from 'node:path';
import { until } from './clusterFixture';

/**
 * The VM id of a task, once its folder exists in one of `storeDirs`: a VM folder is named after its task
 * and run (`<task id>-<run>`), while the results folder is the task's alone.
 */
export async function findVmId(storeDirs: string[], taskId: string): Promise<string> {
  return until(`the VM folder of ${taskId}`, async () => {
    for (const dir of storeDirs) {
      const vms = await fs.readdir(path.join(dir, 'vms')).catch(() => [] as string[]);
      const found = vms.find((d) => d.startsWith(`${taskId}-`));
      if (found) return found;
    }
    return undefined;
  });
}
