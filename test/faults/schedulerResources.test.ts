import { promises as fs } from 'node:fs';
import path from 'node:path';
import { TaskClient, TaskClientError } from '../../client/taskClient';
import { SchedulerClient } from '../../client/schedulerClient';
import { hostCgroupCpu, measureCpuRate, processTree, readCpuShare } from '../../drivers/cpuShare';
import { readPidFile } from '../../drivers/processLiveness';
import { FaultCluster, OWNER, poll, recordFigure } from '../support/faultCluster';

/**
 * The scheduler's durability and per-task CPU control on process-driver hosts (issue 12, items 2 and 7):
 * the scheduler workflow keeps every reservation across a Temporal dev-server restart on its SQLite file;
 * `resize` (through the owners' task API, as `vsp task resize` sends it) caps a busy task's measured CPU
 * rate, and lifting the cap gives it back; a task behind its `deadline` gets a raised share (its cgroup's
 * files, read from the kernel), and the usual share again once its progress catches up. Needs root
 * (cgroups).
 */
let fc: FaultCluster;

beforeAll(async () => {
  fc = await FaultCluster.start({ hosts: ['a', 'b'], hostEnv: { VSP_HOST_HEARTBEAT_SEC: '2' } });
}, 180_000);

afterAll(async () => {
  await fc?.stop();
});

/** A task that spins on the CPU until released, then writes its name. */
const busyCommand = (name: string) => `${fc.taskCommand(name, false)} && while [ ! -e release ]; do :; done`;

const owner = () =>
  new TaskClient({ url: fc.cluster.repositoryUrl, token: fc.cluster.ownerTokens.get(OWNER) ?? '' });

/** The task's processes now: its wrapper (from its pid file) and everything under it. */
async function taskPids(taskId: string): Promise<number[]> {
  const dir = await fc.vmDir(taskId);
  const pid = dir && (await readPidFile(path.join(dir, 'pid')));
  return pid ? processTree(pid) : [];
}

test('the scheduler keeps its reservations across a Temporal restart on the same database file', async () => {
  const ids = await Promise.all(
    ['r0', 'r1', 'r2'].map((n) => fc.submit(`sched-restart-${n}`, { command: fc.taskCommand(n) })),
  );
  for (const id of ids) await fc.untilStarted(id);
  const scheduler = new SchedulerClient(fc.temporal);
  const held = async () =>
    (await scheduler.state()).reservations
      .map((r) => ({ taskId: r.taskId, host: r.host, resources: r.resources }))
      .sort((x, y) => x.taskId.localeCompare(y.taskId));
  const before = await held();
  expect(before.map((r) => r.taskId)).toEqual([...ids].sort());

  await fc.stopTemporal();
  await fc.startTemporal();
  // The control worker picks the scheduler up again: its query answers from the replayed state.
  const after = await poll('the scheduler to answer after the restart', 120_000, () =>
    held().catch(() => undefined),
  );
  expect(after).toEqual(before);
  // And it still grants and gives back: the tasks complete, their reservations end.
  for (const id of ids) await fc.release(id);
  for (const id of ids) expect((await fc.vsp.result(id)).exitCode).toBe(0);
  expect((await scheduler.state()).reservations).toEqual([]);
}, 360_000);

test('resize caps the measured CPU rate of a busy task; lifting the cap gives it back', async () => {
  const taskId = await fc.submit('resize', { command: busyCommand('resize') });
  await fc.untilStarted(taskId);
  const rate = () => measureCpuRate(() => taskPids(taskId), 3000);
  const uncapped = await rate();

  // Input is checked before anything happens: the field's problem, named.
  const bad = await owner()
    .resize(taskId, { capPercent: -5 })
    .catch((e: unknown) => e);
  expect(bad).toBeInstanceOf(TaskClientError);
  expect((bad as TaskClientError).status).toBe(400);
  expect((bad as Error).message).toMatch(/capPercent: capPercent must be at least 0/);

  const status = await owner().resize(taskId, { capPercent: 5 });
  expect(status.cpuShare).toEqual({ capPercent: 5 });
  const vmId = status.vmId as string;
  expect(await readCpuShare(await hostCgroupCpu(), vmId)).toEqual({ capPercent: 5, weight: 100 });
  const capped = await rate();
  await owner().resize(taskId, { capPercent: 0 });
  const lifted = await rate();
  recordFigure('busy task CPU rate uncapped', Number(uncapped.toFixed(3)), 'CPU');
  recordFigure('busy task CPU rate with --cpu-cap 5', Number(capped.toFixed(3)), 'CPU');
  recordFigure('busy task CPU rate with the cap lifted', Number(lifted.toFixed(3)), 'CPU');
  // CFS bandwidth holds the group to 5 ms per 100 ms period: within a margin for the window's edges.
  expect(capped).toBeLessThan(0.08);
  expect(uncapped).toBeGreaterThan(capped * 2);
  expect(lifted).toBeGreaterThan(capped * 2);
  expect((await fc.status(taskId)).cpuShare).toEqual({});

  await fc.release(taskId);
  expect((await fc.vsp.result(taskId)).exitCode).toBe(0);
  // The task's group went with its VM.
  expect(await readCpuShare(await hostCgroupCpu(), vmId)).toBeUndefined();
}, 300_000);

test('a task behind its deadline gets a raised CPU share, and the asked-for share once it catches up', async () => {
  // 40 s to go and no progress: behind once 5 % of the time (the margin) has passed.
  const deadline = new Date(Date.now() + 40_000).toISOString();
  const taskId = await fc.submit('deadline', {
    deadline,
    command: [
      'echo "VSP-PROGRESS 0 starting"',
      busyCommand('deadline'),
      'echo "VSP-PROGRESS 99 caught up"',
      'while [ ! -e release2 ]; do sleep 0.2; done',
    ].join(' && '),
  });
  await fc.untilStarted(taskId);
  const vmId = (await fc.status(taskId)).vmId as string;
  const cg = await hostCgroupCpu();
  // Uncapped, four times the default weight.
  expect(
    await poll('the share to be raised', 60_000, async () => {
      const share = await readCpuShare(cg, vmId);
      return share?.weight === 400 ? share : undefined;
    }),
  ).toEqual({ weight: 400 });
  // Caught up (99 %): back to the default share.
  await fc.release(taskId);
  await poll('the share to be the default again', 60_000, async () =>
    (await readCpuShare(cg, vmId))?.weight === 100 ? true : undefined,
  );
  const dir = (await fc.vmDir(taskId)) as string;
  await fs.writeFile(path.join(dir, 'home', 'release2'), '');
  expect((await fc.vsp.result(taskId)).exitCode).toBe(0);
}, 300_000);
