import { promises as fs } from 'node:fs';

/**
 * A pid alone can be reused after its process dies; the pair (pid, start time in clock ticks since
 * boot, field 22 of /proc/<pid>/stat) names one process for good.
 */
export async function processStartTime(pid: number): Promise<number | undefined> {
  const stat = await readProcStat(pid);
  if (!stat || stat.fields[0] === 'Z' || stat.fields[0] === 'X') return undefined; // gone, or not yet reaped
  return Number(stat.fields[19]);
}

/** /proc/<pid>/stat: the command name, and the fields after it (`fields[0]` is field 3, the state). */
export interface ProcStat {
  comm: string;
  fields: string[];
}

/** A process's /proc/<pid>/stat, split; undefined once it is gone. */
export async function readProcStat(pid: number | string, procDir = '/proc'): Promise<ProcStat | undefined> {
  const stat = await fs.readFile(`${procDir}/${pid}/stat`, 'utf8').catch(() => '');
  // The command name (field 2) may hold spaces and parentheses: parse after its last ')'.
  const close = stat.lastIndexOf(')');
  if (close < 0) return undefined;
  return { comm: stat.slice(stat.indexOf('(') + 1, close), fields: stat.slice(close + 2).split(' ') };
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
