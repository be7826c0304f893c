import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createControlActivities } from '../../activities/control/createControlActivities';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';
import { releaseTask, waitingCommand } from '../support/releasedTasks';
import { capabilityOf } from '../support/taskApi';
import { RepositoryClient } from '../../repository/client';

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
      const { taskId } = await fx.cluster.submitTask('alice', {
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

test('after a restart the reaper stops the VMs of closed runs and keeps their logs; an open run re-attaches', async () => {
  await bothLive();
  const stamp = Date.now();
  const markers = { kept: `vsp-kept-${stamp}`, revoked: `vsp-revoked-${stamp}`, open: `vsp-open-${stamp}` };
  const submitWaiting = (marker: string) =>
    fx.cluster.submitTask('alice', { driver: 'process', host: 'a', command: waitingCommand(marker) });
  const kept = await submitWaiting(markers.kept);
  const revoked = await submitWaiting(markers.revoked);
  const open = await submitWaiting(markers.open);
  await until('the three tasks running', async () => {
    const phases = await Promise.all([kept, revoked, open].map((t) => phaseOf(t.taskId)));
    return phases.every((p) => p === 'running') || undefined;
  });
  const vmsDir = path.join(fx.cluster.storeDir('a'), 'vms');
  expect(await fs.readdir(vmsDir)).toHaveLength(3);

  // Host a dies; two runs end meanwhile (as a HostDown failure would end them), one of them without
  // a working capability any more.
  await fx.cluster.killHost('a');
  for (const t of [kept, revoked])
    await fx.temporal.workflow.getHandle(t.taskId).terminate('the test ends this run while its host is down');
  const capability = await capabilityOf(fx, revoked.taskId);
  expect(await new RepositoryClient({ url: fx.cluster.repositoryUrl, token: capability }).revokeSelf()).toBe(
    true,
  );
  const sweepsBefore = await logCount('a', 'orphan sweep done');
  await fx.cluster.startHost('a');
  await until(
    'the startup sweep',
    async () => (await logCount('a', 'orphan sweep done')) > sweepsBefore || undefined,
  );

  // The closed runs' VMs are gone and their processes stopped.
  const after = await fs.readdir(vmsDir);
  expect(after).toHaveLength(1);
  expect(processRunning(markers.kept)).toBe(false);
  expect(processRunning(markers.revoked)).toBe(false);
  // Logs reach the owner's results while the task's capability works...
  const repo = fx.repo('alice');
  const keptLog = path.join(tmp, `kept-${stamp}.log`);
  await repo.download('alice', `${kept.resultsPath}/logs/task.log`, keptLog);
  expect(await fs.readFile(keptLog, 'utf8')).toContain(`${markers.kept}-started`);
  expect(await repo.stat('alice', `${kept.resultsPath}/logs/reaped.txt`)).toBeDefined();
  // ...which the reaper then revokes, since the run's own last step never ran.
  const audit = await fs.readFile(path.join(fx.cluster.repoDir, 'audit.log'), 'utf8');
  expect(
    audit
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as object),
  ).toContainEqual(expect.objectContaining({ action: 'capability-revoke', task: kept.taskId, result: 'ok' }));
  // ...and stay on the host for the operator once it does not.
  const orphansDir = path.join(fx.cluster.storeDir('a'), 'orphans');
  const orphans = await fs.readdir(orphansDir);
  expect(orphans).toHaveLength(1);
  const orphanLog = await fs.readFile(path.join(orphansDir, orphans[0], 'task.log'), 'utf8');
  expect(orphanLog).toContain(`${markers.revoked}-started`);
  const record = JSON.parse(await fs.readFile(path.join(orphansDir, orphans[0], 'task.json'), 'utf8'));
  expect(record).toMatchObject({ taskId: revoked.taskId, owner: 'alice' });
  expect(record.capability).toBeUndefined();
  expect(await logCount('a', '"action":"remove"')).toBeGreaterThanOrEqual(2);

  // The open run's VM stayed; its task finishes on the restarted worker.
  expect(processRunning(markers.open)).toBe(true);
  await releaseTask(fx.cluster.storeDir('a'), markers.open);
  const result = await fx.vsp.result(open.taskId);
  expect(result.exitCode).toBe(0);
  expect(result.host).toBe('a');
  expect(await fs.readdir(vmsDir)).toEqual([]);
});
