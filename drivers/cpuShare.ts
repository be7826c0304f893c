import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { readProcStat } from './processLiveness';
import type { CpuShare } from './types';

/**
 * A task's CPU share through the Linux `cpu` controller: one cgroup per VM (`vsp/<vmId>`) holding the
 * VM's processes (QEMU, or a process task's whole tree). The cap is CFS bandwidth (cgroup v1
 * cpu.cfs_quota_us, v2 cpu.max) in percent of one CPU, as Xen's `xl sched-credit -c` counts it; the
 * weight is relative to 100 (v1 cpu.shares 1024, v2 cpu.weight 100, Xen credit weight 256).
 */

export const CFS_PERIOD_US = 100_000;
const GROUP_PARENT = 'vsp';

export type CgroupVersion = 'v1' | 'v2';

export interface CgroupCpu {
  version: CgroupVersion;
  /** The hierarchy's root with the cpu controller: /sys/fs/cgroup/cpu (v1) or /sys/fs/cgroup (v2). */
  root: string;
}

let hostCgroup: Promise<CgroupCpu> | undefined;

/** This host's cpu controller (under VSP_CGROUP_ROOT, default /sys/fs/cgroup), looked up once. */
export function hostCgroupCpu(): Promise<CgroupCpu> {
  hostCgroup ??= findCgroupCpu(process.env.VSP_CGROUP_ROOT || undefined);
  return hostCgroup;
}

/** Where the cpu controller is mounted here (v2 unified, else v1 `cpu`), or why there is none. */
export async function findCgroupCpu(base = '/sys/fs/cgroup'): Promise<CgroupCpu> {
  const controllers = await fs.readFile(path.join(base, 'cgroup.controllers'), 'utf8').catch(() => undefined);
  if (controllers?.split(/\s+/).includes('cpu')) return { version: 'v2', root: base };
  for (const dir of ['cpu', 'cpu,cpuacct'])
    if (
      await fs.access(path.join(base, dir, 'cpu.cfs_quota_us')).then(
        () => true,
        () => false,
      )
    )
      return { version: 'v1', root: path.join(base, dir) };
  throw new Error(
    `no cgroup cpu controller under ${base} (neither cgroup v2 with 'cpu' in cgroup.controllers nor a v1 'cpu' hierarchy): CPU shares cannot be set on this host`,
  );
}

/** The files and values that set `share` (absent cap: no limit; absent weight: the default). */
export function cpuControlFiles(version: CgroupVersion, share: CpuShare): Record<string, string> {
  const quota = share.capPercent ? Math.round((share.capPercent / 100) * CFS_PERIOD_US) : undefined;
  const weight = share.weight ?? 100;
  return version === 'v1'
    ? {
        'cpu.cfs_period_us': String(CFS_PERIOD_US),
        'cpu.cfs_quota_us': quota === undefined ? '-1' : String(quota),
        'cpu.shares': String(Math.max(2, Math.round((weight * 1024) / 100))),
      }
    : {
        'cpu.max': `${quota ?? 'max'} ${CFS_PERIOD_US}`,
        'cpu.weight': String(Math.min(10_000, Math.max(1, weight))),
      };
}

function groupDir(cg: CgroupCpu, name: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/.test(name)) throw new Error(`invalid cgroup name '${name}'`);
  return path.join(cg.root, GROUP_PARENT, name);
}

/**
 * Puts `pids` (whole processes: every thread follows) into the group `name` with `share`. Idempotent: the
 * group is made once, its limits written again, processes already there stay.
 */
export async function applyCpuShare(
  cg: CgroupCpu,
  name: string,
  pids: number[],
  share: CpuShare,
): Promise<void> {
  const parent = path.join(cg.root, GROUP_PARENT);
  await fs.mkdir(parent, { recursive: true });
  // v2: a child group gets the cpu controller only if each parent hands it down.
  if (cg.version === 'v2')
    for (const dir of [cg.root, parent]) await fs.writeFile(path.join(dir, 'cgroup.subtree_control'), '+cpu');
  const dir = groupDir(cg, name);
  await fs.mkdir(dir, { recursive: true });
  // In order: v1 checks a quota against the period already written.
  for (const [file, value] of Object.entries(cpuControlFiles(cg.version, share)))
    await fs.writeFile(path.join(dir, file), value);
  let moved = 0;
  for (const pid of pids)
    await fs.writeFile(path.join(dir, 'cgroup.procs'), String(pid)).then(
      () => moved++,
      (err: NodeJS.ErrnoException) => {
        // A process that ended meanwhile has nothing left to limit.
        if (err.code !== 'ESRCH') throw err;
      },
    );
  // Every process gone (the VM stopped while this ran, maybe after its destroy removed the group): the
  // group made again here would outlive it.
  if (pids.length > 0 && moved === 0) {
    await removeCpuGroup(cg, name, 0);
    throw new Error(`no process of ${name} runs any more: its CPU share was not set`);
  }
}

/** The share a group has now (its files read back), or undefined when there is no such group. */
export async function readCpuShare(cg: CgroupCpu, name: string): Promise<CpuShare | undefined> {
  const dir = groupDir(cg, name);
  const read = (f: string) => fs.readFile(path.join(dir, f), 'utf8').then((s) => s.trim());
  try {
    if (cg.version === 'v1') {
      const [period, quota, shares] = await Promise.all(
        ['cpu.cfs_period_us', 'cpu.cfs_quota_us', 'cpu.shares'].map(read),
      );
      const q = Number(quota);
      return {
        ...(q > 0 ? { capPercent: Math.round((q / Number(period)) * 100) } : {}),
        weight: Math.round((Number(shares) * 100) / 1024),
      };
    }
    const [max, weight] = await Promise.all(['cpu.max', 'cpu.weight'].map(read));
    const [q, period] = max.split(' ');
    return {
      ...(q !== 'max' ? { capPercent: Math.round((Number(q) / Number(period)) * 100) } : {}),
      weight: Number(weight),
    };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

/**
 * Removes the VM's group once its processes are gone. A process that has just exited keeps the group
 * busy until its parent reaps it: that is waited for (`waitMs`); a group a live process still uses (the
 * same VM arrived on another host sharing this hierarchy) is left.
 */
export async function removeCpuGroup(cg: CgroupCpu, name: string, waitMs = 5000): Promise<void> {
  const dir = groupDir(cg, name);
  const until = Date.now() + waitMs;
  for (;;) {
    try {
      await fs.rmdir(dir);
      return;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (code !== 'EBUSY') throw err;
    }
    if (Date.now() > until || (await liveMembers(dir)) > 0) return;
    await sleep(100);
  }
}

/**
 * Removes the parent of the VMs' groups once it is empty (a host or test suite that ran its last VM);
 * left as it is while any VM's group remains.
 */
export async function removeCpuParent(cg: CgroupCpu): Promise<void> {
  await fs.rmdir(path.join(cg.root, GROUP_PARENT)).catch((err: NodeJS.ErrnoException) => {
    if (!['ENOENT', 'EBUSY', 'ENOTEMPTY'].includes(err.code ?? '')) throw err;
  });
}

/** Processes in the group that are not zombies. */
async function liveMembers(dir: string): Promise<number> {
  const procs = await fs.readFile(path.join(dir, 'cgroup.procs'), 'utf8').catch(() => '');
  let live = 0;
  for (const pid of procs.split('\n').filter(Boolean)) {
    const stat = await readProcStat(pid);
    if (stat && stat.fields[0] !== 'Z' && stat.fields[0] !== 'X') live++;
  }
  return live;
}

/** `pid` and every process descended from it now (a process task's tree), from /proc. */
export async function processTree(pid: number): Promise<number[]> {
  const parent = new Map<number, number>();
  for (const entry of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await readProcStat(entry);
    // Field 4: the parent's pid.
    if (stat) parent.set(Number(entry), Number(stat.fields[1]));
  }
  const tree = new Set([pid]);
  for (let grew = true; grew;) {
    grew = false;
    for (const [p, pp] of parent)
      if (!tree.has(p) && tree.has(pp)) {
        tree.add(p);
        grew = true;
      }
  }
  return [...tree];
}

/** Seconds of CPU a process has used (user + system, from /proc/<pid>/stat), or undefined when it is gone. */
export async function processCpuSeconds(pid: number): Promise<number | undefined> {
  const f = (await readProcStat(pid))?.fields;
  if (!f) return undefined;
  // utime, stime, cutime, cstime: fields 14-17 (reaped children count in c*).
  return (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) / CLOCK_TICKS;
}

/** USER_HZ: 100 on every Linux architecture VSP runs on. */
const CLOCK_TICKS = 100;

/**
 * CPU a set of processes uses per second of wall time (1.0 = one core busy) over `windowMs` (the tests'
 * and the bench's measure of a share): their user + system seconds at both ends. `pids` is asked at both
 * ends (a tree may change); a process gone by the end leaves what it used out of both.
 */
export async function measureCpuRate(pids: () => Promise<number[]>, windowMs: number): Promise<number> {
  const used = async () => {
    const out = new Map<number, number>();
    for (const pid of await pids()) out.set(pid, (await processCpuSeconds(pid)) ?? 0);
    return out;
  };
  const t0 = performance.now();
  const before = await used();
  // The window is the measurement, not a wait for something to happen.
  await sleep(windowMs);
  const after = await used();
  const seconds = (performance.now() - t0) / 1000;
  let delta = 0;
  for (const [pid, end] of after) delta += end - (before.get(pid) ?? 0);
  return delta / seconds;
}

/**
 * `xl sched-credit` arguments that give domain `domain` the share: cap in percent of one physical CPU
 * (0: none), weight on Xen's scale (default 256 = our 100).
 */
export function xlSchedCreditArgs(domain: string, share: CpuShare): string[] {
  const weight = Math.min(65_535, Math.max(1, Math.round(((share.weight ?? 100) * 256) / 100)));
  return ['sched-credit', '-d', domain, '-w', String(weight), '-c', String(share.capPercent ?? 0)];
}
