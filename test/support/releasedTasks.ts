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

/**
 * A guest task that hashes `input` round after round (`hashes` times a round, then an optional pause),
 * appends each round's hash to out/rounds.txt and prints `VSP-PROGRESS <n> round <i>`, until its VM is
 * shut down: the guest's stop script sends TERM, which the task takes as "finish the round and exit 0".
 * No round count is a guess at how long a migration takes.
 */
export function hashRoundsCommand(input: string, o: { hashes: number; pauseSec?: number }): string {
  const js = Array.from({ length: o.hashes }, (_, i) => i + 1).join(' ');
  return [
    'set -e',
    'mkdir -p out',
    'i=0',
    'stop=',
    "trap 'stop=1' TERM",
    'while [ -z "$stop" ]; do',
    // The stop script's TERM reaches sha256sum too: a cut hash is never counted (the loop breaks first).
    `  for j in ${js}; do [ -z "$stop" ] && { sha256sum ${input} > /tmp/sum || true; }; done`,
    '  [ -n "$stop" ] && break',
    '  i=$((i+1))',
    '  cat /tmp/sum >> out/rounds.txt',
    '  echo "VSP-PROGRESS $((i < 99 ? i : 99)) round $i"',
    ...(o.pauseSec ? [`  sleep ${o.pauseSec} || true`] : []),
    'done',
    'exit 0',
  ].join('\n');
}
