import { setTimeout as sleep } from 'node:timers/promises';

import {
  descendantsOf,
  listProcesses,
  readEnvVar,
  readProc,
  type ProcInfo,
} from '../../deploy/devcluster/procTable';

/** Commands that only a test run should have started; one still running after the suite is a leak. */
const SUITE_COMMANDS = /\btemporal server\b|qemu-system/;

export interface LeftoverProcess {
  pid: number;
  cmdline: string;
  /** Why it counts as the suite's: a child of jest, marked with the run id, or a suite command. */
  reason: 'child' | 'marked' | 'command';
}

export interface LeakCheckOptions {
  /** The jest parent process: everything below it is the suite's. */
  rootPid: number;
  /** Env variable and value that global setup put in the env every test process inherits. */
  marker: { name: string; value: string };
  /**
   * Also count temporal/qemu processes started after the jest parent that carry no run marker. Safe only
   * when nothing else runs on the machine (CI); on a shared development machine they may be someone else's.
   */
  includeUnmarkedCommands: boolean;
}

/** Processes the suite started that are still alive (zombies do not count: they hold no resources). */
export function findLeftoverProcesses(opts: LeakCheckOptions): LeftoverProcess[] {
  const procs = listProcesses().filter((p) => p.state !== 'Z' && p.pid !== opts.rootPid);
  const found = new Map<number, LeftoverProcess>();
  for (const p of descendantsOf(opts.rootPid, procs))
    found.set(p.pid, { pid: p.pid, cmdline: p.cmdline, reason: 'child' });
  const rootStart = readProc(opts.rootPid)?.startTicks ?? 0;
  for (const p of procs) {
    if (found.has(p.pid)) continue;
    const mark = readEnvVar(p.pid, opts.marker.name);
    if (mark === opts.marker.value) found.set(p.pid, { pid: p.pid, cmdline: p.cmdline, reason: 'marked' });
    else if (opts.includeUnmarkedCommands && mark === undefined && isSuiteCommand(p, rootStart)) {
      found.set(p.pid, { pid: p.pid, cmdline: p.cmdline, reason: 'command' });
    }
  }
  return [...found.values()];
}

function isSuiteCommand(p: ProcInfo, since: number): boolean {
  return p.startTicks >= since && SUITE_COMMANDS.test(p.cmdline);
}

/** Waits up to `graceMs` for leftovers to finish exiting; returns those still alive then. */
export async function awaitNoLeftovers(opts: LeakCheckOptions, graceMs = 3000): Promise<LeftoverProcess[]> {
  const deadline = Date.now() + graceMs;
  for (;;) {
    const left = findLeftoverProcesses(opts);
    if (left.length === 0 || Date.now() >= deadline) return left;
    await sleep(100);
  }
}
