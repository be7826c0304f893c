import { promises as fs } from 'node:fs';
import path from 'node:path';

/**
 * Tasks that wait for the test (no timing assumption): the command prints `<marker>-started`, waits for a
 * file `release` in its own home (a task sees only its home, not the host's files), then runs `then`.
 */
export function waitingCommand(marker: string, then = `mkdir -p out; echo ${marker} > out/r.txt`): string {
  return `echo ${marker}-started; while [ ! -e release ]; do sleep 0.1; done; ${then}`;
}

/** The folder of the waiting process-driver task in `storeDir` whose log shows `marker`, if any. */
export async function waitingTaskDir(storeDir: string, marker: string): Promise<string | undefined> {
  const vms = path.join(storeDir, 'vms');
  for (const vm of await fs.readdir(vms).catch(() => [])) {
    const log = await fs.readFile(path.join(vms, vm, 'task.log'), 'utf8').catch(() => '');
    if (log.includes(`${marker}-started`)) return path.join(vms, vm);
  }
  return undefined;
}

/** Releases the waiting process-driver task in `storeDir` whose log shows `marker`. */
export async function releaseTask(storeDir: string, marker: string): Promise<void> {
  const dir = await waitingTaskDir(storeDir, marker);
  if (!dir) throw new Error(`no task in ${storeDir} logged ${marker}-started`);
  await fs.writeFile(path.join(dir, 'home', 'release'), '');
}
