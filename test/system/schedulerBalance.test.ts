import { promises as fs } from 'node:fs';
import path from 'node:path';
import { SchedulerClient } from '../../client/schedulerClient';
import { hostCgroupCpu, readCpuShare } from '../../drivers/cpuShare';
import type { TaskSpecInput } from '../../spec/taskSpec';
import {
  configureUpdate,
  drainUpdate,
  undrainUpdate,
  type SchedulerSnapshot,
} from '../../workflows/scheduling/definitions';
import { until } from '../support/clusterFixture';
import { startNamespaceCluster, type NamespaceCluster } from '../support/namespaceCluster';
import { qemuHostsOf } from '../support/vmProcesses';

/**
 * Rebalancing on namespace test hosts with QEMU (issue 12, item 5 and Acceptance): the control worker's
 * Temporal Schedule ticks every 3 s; with b drained, three VM tasks start on a; b back, a round moves one
 * of them to b by live migration (recorded in its migration history) and later rounds move nothing (2/1
 * is balanced); under `pack`, a round empties the less used host. Hosts of 2 vCPUs and 1 GiB, so that
 * three 128 MiB VMs make an uneven cluster. Each VM is resized to half a CPU first (its QEMU's cgroup),
 * and the share follows the VM that moves. Needs root.
 */
const HOSTS = ['a', 'b'];
const OWNER = 'alice';

let ns: NamespaceCluster;

beforeAll(async () => {
  ns = await startNamespaceCluster({
    hosts: HOSTS,
    prefix: 'vspsc-',
    subnet: '10.77.42',
    owners: [OWNER],
    hostEnv: { VSP_HOST_MEMORY_MIB: '1024', VSP_HOST_VCPUS: '2', VSP_HOST_HEARTBEAT_SEC: '2' },
    controlEnv: { VSP_SCHED_REBALANCE_EVERY_SEC: '3', VSP_SCHED_REBALANCE_MAX_IN_FLIGHT: '1' },
  });
  await ns.cluster.startControl();
}, 240_000);

afterAll(async () => {
  await ns?.stop();
}, 120_000);

test('rebalancing moves a VM from the host with 3 to the empty one and stops when balanced; pack empties a host', async () => {
  const { cluster, vsp } = ns;
  const scheduler = new SchedulerClient(ns.client);
  const stores = Object.fromEntries(HOSTS.map((h) => [h, cluster.storeDir(h)]));
  await until('both hosts to report their inventory', async () => {
    const s = await scheduler.state({ fresh: true });
    return s.hosts.every((h) => h.state === 'ready' && h.capacity?.memoryMiB === 1024) || undefined;
  });
  // b in maintenance: every task goes to a.
  await scheduler.update(drainUpdate, { host: 'b' });
  const vm: TaskSpecInput = {
    owner: OWNER,
    driver: 'qemu',
    memoryMiB: 128,
    command: 'echo idle-started; while [ ! -e release ]; do sleep 1; done',
  };
  const ids: string[] = [];
  for (let i = 0; i < 3; i++) ids.push((await cluster.submitTask(OWNER, vm)).taskId);
  await until(
    'three VM tasks running on a',
    async () => {
      const s = await Promise.all(ids.map((id) => vsp.status(id)));
      return s.every((x) => x.phase === 'running' && x.host === 'a') || undefined;
    },
    600_000,
  );
  // Each VM capped at half a CPU: the share is its QEMU's cgroup, and it follows the VM when it moves.
  const cg = await hostCgroupCpu();
  const vmIds = new Map<string, string>();
  for (const id of ids) {
    const s = await vsp.resize(id, { capPercent: 50 });
    expect(s.cpuShare).toEqual({ capPercent: 50 });
    vmIds.set(id, s.vmId as string);
    expect(await readCpuShare(cg, s.vmId as string)).toEqual({ capPercent: 50, weight: 100 });
  }
  /** The VM's QEMU processes in its cgroup now. */
  const qemusInGroup = async (vmId: string) => {
    const procs = await fs.readFile(path.join(cg.root, 'vsp', vmId, 'cgroup.procs'), 'utf8').catch(() => '');
    const out: string[] = [];
    for (const pid of procs.split('\n').filter(Boolean)) {
      const cmd = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
      if (cmd.includes('qemu-system') && cmd.includes(vmId)) out.push(pid);
    }
    return out;
  };
  for (const vmId of vmIds.values()) expect(await qemusInGroup(vmId)).toHaveLength(1);
  const tasksOn = (s: SchedulerSnapshot) => Object.fromEntries(s.hosts.map((h) => [h.host, h.tasks.length]));
  /** The state once a round later than `round` has found nothing more to gain. */
  const balancedAfter = (round: number, timeoutMs = 600_000) =>
    until(
      `a rebalancing round after round ${round} to end balanced`,
      async () => {
        const s = await scheduler.state();
        return s.balance && s.balance.rounds > round && s.balance.balanced ? s : undefined;
      },
      timeoutMs,
    );
  // Rounds while b is drained move nothing: a drained host takes no task.
  let state = await balancedAfter(0, 60_000);
  expect(tasksOn(state)).toEqual({ a: 3, b: 0 });
  expect(state.balance?.moved).toBe(0);

  await scheduler.update(undrainUpdate, { host: 'b' });
  state = await balancedAfter((await scheduler.state()).balance?.rounds ?? 0);
  expect(tasksOn(state)).toEqual({ a: 2, b: 1 });
  expect(state.balance).toMatchObject({ moved: 1, failed: 0, inFlight: {} });
  const movedId = state.hosts.find((h) => h.host === 'b')?.tasks[0] as string;
  const moved = await vsp.status(movedId);
  expect(moved).toMatchObject({ phase: 'running', host: 'b', storageHost: 'a' });
  expect(moved.migrations).toEqual([expect.objectContaining({ from: 'a', to: 'b', ok: true })]);
  expect(await qemuHostsOf(moved.vmId as string, stores)).toEqual(['b']);
  // The QEMU on b took the task's share: the cap is in force there too.
  await until('the moved VM to be in its cgroup on b', async () =>
    (await qemusInGroup(moved.vmId as string)).length === 1 ? true : undefined,
  );
  expect(moved.cpuShare).toEqual({ capPercent: 50 });
  expect(await readCpuShare(cg, moved.vmId as string)).toEqual({ capPercent: 50, weight: 100 });
  // Balanced: two more rounds move nothing.
  state = await balancedAfter((state.balance?.rounds ?? 0) + 1, 60_000);
  expect(tasksOn(state)).toEqual({ a: 2, b: 1 });
  expect(state.balance?.moved).toBe(1);

  // Pack: the less used host (b) is emptied into a.
  await scheduler.update(configureUpdate, { ...state.config, policy: 'pack' });
  state = await balancedAfter(state.balance?.rounds ?? 0);
  expect(tasksOn(state)).toEqual({ a: 3, b: 0 });
  expect(state.balance).toMatchObject({ moved: 2, failed: 0 });
  const back = await vsp.status(movedId);
  expect(back).toMatchObject({ phase: 'running', host: 'a' });
  expect(back.migrations?.map((m) => [m.from, m.to, m.ok])).toEqual([
    ['a', 'b', true],
    ['b', 'a', true],
  ]);
  for (const id of ids) {
    const s = await vsp.status(id);
    expect(await qemuHostsOf(s.vmId as string, stores)).toEqual(['a']);
  }

  for (const id of ids) await vsp.cancel(id, 'test done');
  await Promise.all(ids.map((id) => vsp.result(id).catch(() => undefined)));
  const end = await scheduler.state();
  expect(end.hosts.map((h) => h.tasks)).toEqual([[], []]);
  // The VMs' groups went with them.
  for (const vmId of vmIds.values()) expect(await readCpuShare(cg, vmId)).toBeUndefined();
}, 1_500_000);
