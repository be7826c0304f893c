import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { LocalCluster } from '../../deploy/devcluster/localCluster';

/**
 * A task that outlasts a check only because the test says so: it logs `<marker>-started`, waits for a
 * `release` file in its home, then leaves one output. The task sees only its own home (the process
 * driver isolates it), so the test drops the file there, in the host's VM store.
 */
export function waitingCommand(marker: string): string {
  return `echo ${marker}-started; while [ ! -e release ]; do sleep 0.1; done; mkdir -p out; echo ${marker} > out/r.txt`;
}

/** The VM folder on `host` of the waiting task whose log shows `marker`. */
export async function vmDirOf(cluster: LocalCluster, host: string, marker: string): Promise<string> {
  const vms = path.join(cluster.storeDir(host), 'vms');
  for (const vm of await fs.readdir(vms)) {
    const log = await fs.readFile(path.join(vms, vm, 'task.log'), 'utf8').catch(() => '');
    if (log.includes(`${marker}-started`)) return path.join(vms, vm);
  }
  throw new Error(`no task on host ${host} logged ${marker}-started`);
}

/** Releases the waiting task on `host` whose log shows `marker`. */
export async function releaseTask(cluster: LocalCluster, host: string, marker: string): Promise<void> {
  await fs.writeFile(path.join(await vmDirOf(cluster, host, marker), 'home', 'release'), '');
}
