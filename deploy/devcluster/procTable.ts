import { readFileSync, readdirSync } from 'node:fs';

/** One Linux process as /proc shows it. */
export interface ProcInfo {
  pid: number;
  ppid: number;
  pgid: number;
  /** One-letter state from /proc/PID/stat: R, S, D, Z (zombie), ... */
  state: string;
  /** Start time in clock ticks since boot: orders processes by age. */
  startTicks: number;
  /** Command line, arguments joined by spaces (empty for kernel threads). */
  cmdline: string;
}

/** A process's /proc/PID/stat, or undefined when it is gone. */
export function readProc(pid: number): ProcInfo | undefined {
  let stat: string;
  let cmdline: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  } catch {
    return undefined;
  }
  // The command name (field 2) is in parentheses and may hold spaces: parse after its closing one.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return {
    pid,
    state: fields[0],
    ppid: Number(fields[1]),
    pgid: Number(fields[2]),
    startTicks: Number(fields[19]),
    cmdline: cmdline.split('\0').filter(Boolean).join(' '),
  };
}

/** All processes visible in /proc, skipping those that vanish while we read. */
export function listProcesses(): ProcInfo[] {
  const out: ProcInfo[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const info = readProc(Number(entry));
    if (info) out.push(info);
  }
  return out;
}

/** Live (non-zombie) members of a process group. */
export function liveGroupMembers(pgid: number): ProcInfo[] {
  return listProcesses().filter((p) => p.pgid === pgid && p.state !== 'Z');
}

/** The environment variable `name` of a process, or undefined when unset or unreadable. */
export function readEnvVar(pid: number, name: string): string | undefined {
  try {
    const prefix = `${name}=`;
    const entry = readFileSync(`/proc/${pid}/environ`, 'utf8')
      .split('\0')
      .find((e) => e.startsWith(prefix));
    return entry?.slice(prefix.length);
  } catch {
    return undefined;
  }
}

/** Processes descended from `ancestorPid` (children, grandchildren, ...), not including it. */
export function descendantsOf(ancestorPid: number, procs: ProcInfo[] = listProcesses()): ProcInfo[] {
  const byParent = new Map<number, ProcInfo[]>();
  for (const p of procs) byParent.set(p.ppid, [...(byParent.get(p.ppid) ?? []), p]);
  const out: ProcInfo[] = [];
  const queue = [ancestorPid];
  while (queue.length > 0) {
    for (const child of byParent.get(queue.shift() as number) ?? []) {
      out.push(child);
      queue.push(child.pid);
    }
  }
  return out;
}
