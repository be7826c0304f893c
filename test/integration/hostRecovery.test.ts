import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { temporal } from '@temporalio/proto';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';
import { releaseTask, waitingCommand } from '../support/releasedTasks';

/**
 * A host worker killed (SIGKILL) and restarted at once, in stage-in and while the task runs: the new
 * worker releases its predecessor's attempts (no timeout to wait for), the retried step picks up where
 * the VM store is, and the time from the kill to the retried step's start is printed (FIGURE lines) for
 * the closing note. Process driver, real Temporal and repository.
 */
let fx: ClusterFixture;
let tmp: string;

const STARTED = temporal.api.enums.v1.PendingActivityState.PENDING_ACTIVITY_STATE_STARTED;
const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');
const toMs = (t: { seconds?: unknown; nanos?: number | null } | null | undefined) =>
  t?.seconds == null ? 0 : Number(t.seconds) * 1000 + Math.floor((t.nanos ?? 0) / 1e6);

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-recovery-'));
  fx = await startClusterFixture({
    hosts: ['a'],
    owners: ['alice'],
    hostEnv: { VSP_HOST_HEARTBEAT_SEC: '1' },
  });
}, 180_000);

afterAll(async () => {
  await fx?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

async function pendingStep(taskId: string, name: string) {
  const d = await fx.temporal.workflow.getHandle(taskId).describe();
  return d.raw.pendingActivities?.find((a) => a.activityType?.name === name);
}

/** When the last attempt of `name` started, and its number, from the task's history. */
async function lastAttempt(taskId: string, name: string): Promise<{ attempt: number; startedMs: number }> {
  const events = (await fx.temporal.workflow.getHandle(taskId).fetchHistory()).events ?? [];
  const scheduled = events.find((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === name);
  const started = events.find(
    (e) =>
      String(e.activityTaskStartedEventAttributes?.scheduledEventId ?? '') === String(scheduled?.eventId),
  );
  return {
    attempt: started?.activityTaskStartedEventAttributes?.attempt ?? 0,
    startedMs: toMs(started?.eventTime),
  };
}

async function hostLogCount(text: string): Promise<number> {
  const log = await fs.readFile(path.join(fx.cluster.logDir, 'host-a.log'), 'utf8').catch(() => '');
  return log.split('\n').filter((l) => l.includes(text)).length;
}

test('stage-in: timer heartbeats while the repository stalls; after a kill the retry drops the partial download and completes', async () => {
  const input = Buffer.alloc(8 << 20, 3);
  const local = path.join(tmp, 'big.bin');
  await fs.writeFile(local, input);
  await fx.repo('alice').upload('alice', 'in/big.bin', local);
  const repository = fx.cluster.repositoryProcess;
  if (!repository) throw new Error('the cluster has no repository process');
  const removedBefore = await hostLogCount('partial downloads of an earlier attempt removed');

  // Submitted while host a's worker is down (it stays placeable for its liveness period), so that the
  // repository can stop answering before stage-in begins: the download then waits on it and only the
  // timer shows the step alive.
  await fx.cluster.killHost('a');
  const { taskId } = await fx.cluster.submitTask('alice', {
    driver: 'process',
    inputs: ['in/big.bin'],
    command: 'mkdir -p out && sha256sum in/big.bin > out/sum.txt',
  });
  process.kill(repository.pid, 'SIGSTOP');
  let killedAt: number;
  try {
    await fx.cluster.startHost('a');
    const first = await until('a stage-in heartbeat', async () => {
      const a = await pendingStep(taskId, 'stageIn');
      return a?.lastHeartbeatTime ? toMs(a.lastHeartbeatTime) : undefined;
    });
    await until('a later stage-in heartbeat', async () => {
      const a = await pendingStep(taskId, 'stageIn');
      return toMs(a?.lastHeartbeatTime) > first || undefined;
    });
    // What a kill in the middle of a download leaves behind.
    const [vmId] = await fs.readdir(path.join(fx.cluster.storeDir('a'), 'vms'));
    const inputsDir = path.join(fx.cluster.storeDir('a'), 'vms', vmId, 'inputs', 'in');
    await fs.mkdir(inputsDir, { recursive: true });
    await fs.writeFile(path.join(inputsDir, '.big.bin.0123456789ab.part'), 'partial');
    await fx.cluster.killHost('a');
    killedAt = Date.now();
  } finally {
    process.kill(repository.pid, 'SIGCONT');
  }
  await fx.cluster.startHost('a');
  const restartedAt = Date.now();

  const result = await fx.vsp.result(taskId);
  expect(result.exitCode).toBe(0);
  const sum = result.outputs.find((o) => o.path.endsWith('outputs/sum.txt'));
  const dest = path.join(tmp, 'sum.txt');
  await fx.repo('alice').download('alice', sum!.path, dest);
  expect(await fs.readFile(dest, 'utf8')).toContain(sha256(input));
  expect(await hostLogCount('partial downloads of an earlier attempt removed')).toBe(removedBefore + 1);
  const retried = await lastAttempt(taskId, 'stageIn');
  expect(retried.attempt).toBeGreaterThanOrEqual(2);
  // The restarted worker releases its predecessor's attempt: no heartbeat timeout to wait for.
  expect(retried.startedMs - restartedAt).toBeLessThanOrEqual(15_000);
  process.stderr.write(
    `\nFIGURE recovery staging-in: ${retried.startedMs - killedAt} ms from kill to retry\n`,
  );
});

test('running: the VM outlives a killed worker and the restarted worker re-attaches to it', async () => {
  const marker = `vsp-running-${Date.now()}`;
  const { taskId } = await fx.cluster.submitTask('alice', {
    driver: 'process',
    command: waitingCommand(marker, 'echo VSP-PROGRESS 100 done'),
  });
  await until('the task waiting for its release', async () => {
    const a = await pendingStep(taskId, 'awaitVm');
    return (a?.state === STARTED && a.lastHeartbeatTime) || undefined;
  });
  await fx.cluster.killHost('a');
  const killedAt = Date.now();
  await fx.cluster.startHost('a');
  const restartedAt = Date.now();
  const reattachedAt = await until('awaitVm re-attached', async () => {
    const a = await pendingStep(taskId, 'awaitVm');
    return (a && (a.attempt ?? 0) >= 2 && a.state === STARTED && Date.now()) || undefined;
  });
  process.stderr.write(`\nFIGURE recovery running: ${reattachedAt - killedAt} ms from kill to re-attach\n`);
  expect(reattachedAt - restartedAt).toBeLessThanOrEqual(15_000);
  await releaseTask(fx.cluster.storeDir('a'), marker);
  const result = await fx.vsp.result(taskId);
  expect(result.exitCode).toBe(0);
  expect(await fs.readdir(path.join(fx.cluster.storeDir('a'), 'vms'))).toEqual([]);
});
