import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  applyCpuShare,
  cpuControlFiles,
  findCgroupCpu,
  readCpuShare,
  removeCpuGroup,
  xlSchedCreditArgs,
} from '../../drivers/cpuShare';
import type { Appliance } from '../../drivers/qemu/appliance';
import type { VmHandle } from '../../drivers/types';
import { XenDriver } from '../../drivers/xen/xenDriver';
import type { XlRunner } from '../../drivers/xen/xl';
import { deadlineShare } from '../../scheduler/deadline';
import { VmStore } from '../../storage/vmStore';
import { ResizeRequestSchema } from '../../workflows/definitions';

/**
 * CPU shares (drivers/cpuShare.ts): the cgroup files for v1 and v2 (written into a folder shaped like
 * each hierarchy; the kernel's own files are exercised by the system tier), Xen's `xl sched-credit`
 * arguments, the resize request's checks and the deadline's verdict (scheduler/deadline.ts).
 */

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-cpushare-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

test('cap and weight in each hierarchy: percent of one CPU as CFS quota, weight 100 as the default', () => {
  expect(cpuControlFiles('v1', { capPercent: 50 })).toEqual({
    'cpu.cfs_period_us': '100000',
    'cpu.cfs_quota_us': '50000',
    'cpu.shares': '1024',
  });
  expect(cpuControlFiles('v1', { weight: 400 })).toMatchObject({
    'cpu.cfs_quota_us': '-1',
    'cpu.shares': '4096',
  });
  expect(cpuControlFiles('v2', { capPercent: 150, weight: 200 })).toEqual({
    'cpu.max': '150000 100000',
    'cpu.weight': '200',
  });
  expect(cpuControlFiles('v2', {})).toEqual({ 'cpu.max': 'max 100000', 'cpu.weight': '100' });
});

test('the hierarchy found: v2 when its root offers cpu, else the v1 cpu mount, else a clear error', async () => {
  await expect(findCgroupCpu(dir)).rejects.toThrow(
    /no cgroup cpu controller under .*CPU shares cannot be set/,
  );
  await fs.mkdir(path.join(dir, 'cpu'));
  await fs.writeFile(path.join(dir, 'cpu', 'cpu.cfs_quota_us'), '-1');
  expect(await findCgroupCpu(dir)).toEqual({ version: 'v1', root: path.join(dir, 'cpu') });
  await fs.writeFile(path.join(dir, 'cgroup.controllers'), 'cpuset cpu io memory pids\n');
  expect(await findCgroupCpu(dir)).toEqual({ version: 'v2', root: dir });
});

test('v2: the cpu controller handed down, the limits written, the processes moved; read back; removed', async () => {
  const cg = { version: 'v2' as const, root: dir };
  await applyCpuShare(cg, 'vm-1', [4242], { capPercent: 25, weight: 50 });
  const group = path.join(dir, 'vsp', 'vm-1');
  expect(await fs.readFile(path.join(dir, 'cgroup.subtree_control'), 'utf8')).toBe('+cpu');
  expect(await fs.readFile(path.join(dir, 'vsp', 'cgroup.subtree_control'), 'utf8')).toBe('+cpu');
  expect(await fs.readFile(path.join(group, 'cpu.max'), 'utf8')).toBe('25000 100000');
  expect(await fs.readFile(path.join(group, 'cgroup.procs'), 'utf8')).toBe('4242');
  expect(await readCpuShare(cg, 'vm-1')).toEqual({ capPercent: 25, weight: 50 });
  expect(await readCpuShare(cg, 'vm-2')).toBeUndefined();
  await expect(applyCpuShare(cg, '../escape', [1], {})).rejects.toThrow(/invalid cgroup name/);
  for (const f of await fs.readdir(group)) await fs.rm(path.join(group, f));
  await removeCpuGroup(cg, 'vm-1');
  await removeCpuGroup(cg, 'vm-1');
  expect(await fs.readdir(path.join(dir, 'vsp'))).toEqual(['cgroup.subtree_control']);
});

test('v1: period before quota, shares from the weight; an uncapped group reads back without a cap', async () => {
  const cg = { version: 'v1' as const, root: dir };
  await applyCpuShare(cg, 'vm-1', [], { weight: 200 });
  expect(await readCpuShare(cg, 'vm-1')).toEqual({ weight: 200 });
  await applyCpuShare(cg, 'vm-1', [], { capPercent: 10 });
  expect(await readCpuShare(cg, 'vm-1')).toEqual({ capPercent: 10, weight: 100 });
});

test('Xen: xl sched-credit with the domain, the weight on Xen scale (256 = 100) and the cap (0 = none)', () => {
  expect(xlSchedCreditArgs('vsp-t1', { capPercent: 50 })).toEqual([
    'sched-credit',
    '-d',
    'vsp-t1',
    '-w',
    '256',
    '-c',
    '50',
  ]);
  expect(xlSchedCreditArgs('vsp-t1', { weight: 400 })).toEqual([
    'sched-credit',
    '-d',
    'vsp-t1',
    '-w',
    '1024',
    '-c',
    '0',
  ]);
});

test('Xen driver: setCpuShare runs xl sched-credit on the running domain; a VM not here is refused', async () => {
  const calls: string[][] = [];
  let running = true;
  const xl: XlRunner = async (args) => {
    calls.push(args);
    if (args[0] !== 'list') return { stdout: '', stderr: '' };
    if (!running) throw new Error(`${args[1]} is an invalid domain identifier (rc=-6)`);
    return { stdout: `Name ID Mem VCPUs\tState\tTime(s)\n${args[1]} 7 256 1 -b---- 0.4\n`, stderr: '' };
  };
  const driver = new XenDriver({
    store: new VmStore(dir),
    hostName: 'a',
    appliance: {} as Appliance,
    mountRoot: '/var/lib/vsp/cluster',
    xl,
  });
  const handle: VmHandle = { driver: 'xen', vmId: 't1', host: 'a', storageHost: 'a', state: {} };
  await driver.setCpuShare(handle, { capPercent: 50, weight: 200 });
  expect(calls).toEqual([
    ['list', 'vsp-t1'],
    ['sched-credit', '-d', 'vsp-t1', '-w', '512', '-c', '50'],
  ]);
  running = false;
  await expect(driver.setCpuShare(handle, { capPercent: 10 })).rejects.toThrow(
    /VM t1 does not run on host a: its CPU share cannot change/,
  );
});

test('resize requests: whole numbers in range, at least one field, nothing else', () => {
  expect(ResizeRequestSchema.parse({ capPercent: 50 })).toEqual({ capPercent: 50 });
  const problems = (r: unknown) => {
    const p = ResizeRequestSchema.safeParse(r);
    return p.success ? [] : p.error.issues.map((i) => i.message);
  };
  expect(problems({})).toEqual(['give capPercent, weight or both']);
  expect(problems({ capPercent: -1 })).toEqual(['capPercent must be at least 0 (0 lifts the cap)']);
  expect(problems({ capPercent: 12.5 })).toEqual(['capPercent must be a whole number of percent']);
  expect(problems({ capPercent: 6401 })).toEqual(['capPercent must be at most 6400 (64 CPUs)']);
  expect(problems({ weight: 0 })).toEqual(['weight must be at least 1']);
  expect(problems({ capPercent: 50, cores: 2 })).toHaveLength(1);
});

test('deadline: behind when progress lags the time used by more than the margin; then uncapped, 4x weight', () => {
  const start = 0;
  const end = 100_000;
  // Half the time used, 10 % done: behind.
  expect(deadlineShare({ capPercent: 20 }, 10, start, end, 50_000)).toEqual({
    expected: 50,
    behind: true,
    share: { weight: 400 },
  });
  // On pace (within the margin), or no progress reported: the share asked for.
  expect(deadlineShare({ capPercent: 20 }, 47, start, end, 50_000)).toMatchObject({
    behind: false,
    share: { capPercent: 20 },
  });
  expect(deadlineShare({ capPercent: 20 }, undefined, start, end, 90_000).behind).toBe(false);
  // Past the deadline: everything is expected; done is done.
  expect(deadlineShare({}, 99, start, end, 200_000)).toMatchObject({ expected: 100, behind: false });
  expect(deadlineShare({ weight: 5000 }, 0, start, end, 200_000).share).toEqual({ weight: 10_000 });
});
