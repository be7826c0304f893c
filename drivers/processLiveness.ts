import { promises as fs } from 'node:fs';

/**
 * A pid alone can be reused after its process dies; the pair (pid, start time in clock ticks since
 * boot, field 22 of /proc/<pid>/stat) names one process for good.
 */
export async function processStartTime(pid: number): Promise<number | undefined> {
  try {
    const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: parse after its last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (fields[0] === 'Z' || fields[0] === 'X') return undefined; // exited, not yet reaped
    return Number(fields[19]);
  } catch {
    return undefined;
  }
}

export async function isSameProcessAlive(pid: number, startTime: number): Promise<boolean> {
  return (await processStartTime(pid)) === startTime;
}

/** The pid a pid file names, if it names one. */
export async function readPidFile(file: string): Promise<number | undefined> {
  try {
    const pid = Number((await fs.readFile(file, 'utf8')).trim());
    return Number.isInteger(pid) && pid > 1 ? pid : undefined;
  } catch {
    return undefined;
  }
}
