import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createControlActivities } from '../../activities/control/createControlActivities';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';
import { releaseTask, waitingCommand } from '../support/releasedTasks';

/**
 * Host durability with the process driver against real Temporal and a real repository: liveness and
 * placement after a host worker is killed, and the orphan reaper after a restart.
 */
const LIVENESS_SEC = 4;
const HEARTBEAT_SEC = 1;

let fx: ClusterFixture;
let tmp: string;
let control: ReturnType<typeof createControlActivities>;

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-durability-'));
  // The control worker reads it from its environment (the cluster passes ours on).
  process.env.VSP_HOST_LIVENESS_SEC = String(LIVENESS_SEC);
  try {
    fx = await startClusterFixture({
      hosts: ['a', 'b'],
      owners: ['alice'],
      hostEnv: { VSP_HOST_HEARTBEAT_SEC: String(HEARTBEAT_SEC) },
    });
  } finally {
    delete process.env.VSP_HOST_LIVENESS_SEC;
  }
  control = createControlActivities({
    client: fx.temporal,
    hosts: ['a', 'b'],
    hostLivenessSec: LIVENESS_SEC,
  });
}, 180_000);

afterAll(async () => {
  await fx?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

const live = (host: string) => control.hostStatus(host).then((s) => s.live || undefined);

async function bothLive(): Promise<void> {
  await until('hosts a and b live', async () => (await live('a')) && (await live('b')));
}

function processRunning(marker: string): boolean {
  const out = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' });
  return out.split('\n').some((l) => l.includes(marker) && !l.includes('ps -eo'));
}

async function phaseOf(taskId: string): Promise<string | undefined> {
  return (await fx.vsp.status(taskId)).phase;
}

async function logCount(host: string, text: string): Promise<number> {
  const log = await fs.readFile(path.join(fx.cluster.logDir, `host-${host}.log`), 'utf8').catch(() => '');
  return log.split('\n').filter((l) => l.includes(text)).length;
}

test('a killed host worker is down within its liveness period; placement avoids it until it returns', async () => {
  await bothLive();
  const killedAt = Date.now();
  await fx.cluster.killHost('b');
  const down = await until(
    'host b down',
    async () => {
      const s = await control.hostStatus('b');
      return s.live ? undefined : s;
    },
    60_000,
  );
  const detectMs = Date.now() - killedAt;
  process.stderr.write(`\nFIGURE dead host detected after ${detectMs} ms (liveness ${LIVENESS_SEC} s)\n`);
  expect(down.reason).toMatch(/host b is down: last heartbeat/);
  // Within one liveness period after the last beat, which is at most a heartbeat period before the kill.
  expect(detectMs).toBeLessThanOrEqual((2 * LIVENESS_SEC + HEARTBEAT_SEC) * 1000);

  const results = await Promise.all(
    [1, 2, 3].map(async (i) => {
      const { taskId } = await fx.vsp.submit({
        owner: 'alice',
        driver: 'process',
        command: `echo placed-${i}`,
      });
      return fx.vsp.result(taskId);
    }),
  );
  expect(results.map((r) => r.host)).toEqual(['a', 'a', 'a']);

  await fx.cluster.startHost('b');
  await until('host b live again', () => live('b'));
});

test('after a restart the reaper stops the VM of a closed run and keeps its logs; an open run re-attaches', async () => {
  await bothLive();
  const stamp = Date.now();
  const closedMarker = `vsp-orphan-${stamp}`;
  const openMarker = `vsp-open-${stamp}`;
  const closed = await fx.vsp.submit({
    owner: 'alice',
    driver: 'process',
    host: 'a',
    command: waitingCommand(closedMarker),
  });
  const open = await fx.vsp.submit({
    owner: 'alice',
    driver: 'process',
    host: 'a',
    command: waitingCommand(openMarker),
  });
  await until('both tasks running', async () => {
    const phases = await Promise.all([phaseOf(closed.taskId), phaseOf(open.taskId)]);
    return phases.every((p) => p === 'running') || undefined;
  });
  const vmsDir = path.join(fx.cluster.storeDir('a'), 'vms');
  const before = await fs.readdir(vmsDir);
  expect(before).toHaveLength(2);

  await fx.cluster.killHost('a');
  await fx.temporal.workflow
    .getHandle(closed.taskId)
    .terminate('the test ends this run while its host is down');
  const sweepsBefore = await logCount('a', 'orphan sweep done');
  await fx.cluster.startHost('a');
  await until(
    'the startup sweep',
    async () => (await logCount('a', 'orphan sweep done')) > sweepsBefore || undefined,
  );

  // The closed run's VM is gone, its process stopped, its logs kept for the operator (no capability).
  const after = await fs.readdir(vmsDir);
  expect(after).toHaveLength(1);
  expect(processRunning(closedMarker)).toBe(false);
  const orphansDir = path.join(fx.cluster.storeDir('a'), 'orphans');
  const kept = (await fs.readdir(orphansDir)).filter((d) => !after.some((v) => d.startsWith(`${v}-`)));
  expect(kept).toHaveLength(1);
  const keptLog = await fs.readFile(path.join(orphansDir, kept[0], 'task.log'), 'utf8');
  expect(keptLog).toContain(`${closedMarker}-started`);
  const record = JSON.parse(await fs.readFile(path.join(orphansDir, kept[0], 'task.json'), 'utf8'));
  expect(record).toMatchObject({ taskId: closed.taskId, owner: 'alice' });
  expect(record.capability).toBeUndefined();
  expect(await logCount('a', '"action":"remove"')).toBeGreaterThanOrEqual(1);

  // The open run's VM stayed; its task finishes on the restarted worker.
  expect(processRunning(openMarker)).toBe(true);
  await releaseTask(fx.cluster.storeDir('a'), openMarker);
  const result = await fx.vsp.result(open.taskId);
  expect(result.exitCode).toBe(0);
  expect(result.host).toBe('a');
  expect(await fs.readdir(vmsDir)).toEqual([]);
});
