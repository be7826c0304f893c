import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { WorkflowFailedError } from '@temporalio/client';
import { temporal } from '@temporalio/proto';
import { createControlActivities } from '../../activities/control/createControlActivities';
import { taskFailureMessage } from '../../client/vspClient';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';

/**
 * Host durability with the process driver against real Temporal and a real repository: liveness and
 * placement after a host worker is killed, the orphan reaper after a restart, and a full VM store as
 * one clear non-retryable error.
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

/** A command that waits for `release` (a file the test creates) and leaves one output. */
function waitingCommand(marker: string, release: string): string {
  return `echo ${marker}-started; while [ ! -e ${release} ]; do sleep 0.1; done; mkdir -p out; echo ${marker} > out/r.txt`;
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
  expect(down.lastSeenMs).toBeLessThanOrEqual(killedAt);
  // Within one liveness period after the last beat, which is at most a heartbeat period before the kill.
  expect(detectMs).toBeLessThanOrEqual((2 * LIVENESS_SEC + HEARTBEAT_SEC) * 1000);

  const results = await Promise.all(
    [1, 2, 3].map(async (i) => {
      const { taskId } = await fx.vsp.submit({ owner: 'alice', command: `echo placed-${i}` });
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
  const releaseOpen = path.join(tmp, `release-open-${stamp}`);
  const closed = await fx.vsp.submit({
    owner: 'alice',
    host: 'a',
    command: waitingCommand(closedMarker, path.join(tmp, `never-${stamp}`)),
  });
  const open = await fx.vsp.submit({
    owner: 'alice',
    host: 'a',
    command: waitingCommand(openMarker, releaseOpen),
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
  await fs.writeFile(releaseOpen, '');
  const result = await fx.vsp.result(open.taskId);
  expect(result.exitCode).toBe(0);
  expect(result.host).toBe('a');
  expect(await fs.readdir(vmsDir)).toEqual([]);
});

const rootOnly = process.getuid?.() === 0 ? test : test.skip;

rootOnly(
  'a full VM store fails the task at once with StoreFull and its first cause, leaving nothing',
  async () => {
    await bothLive();
    // Host b's worker gets a store on a 1 MiB tmpfs in a mount namespace of its own (gone with it).
    await fx.cluster.killHost('b');
    const store = fx.cluster.storeDir('b');
    const tiny = await fx.cluster.startHost('b', (cmd, args) => ({
      cmd: 'unshare',
      args: [
        '--mount',
        '--propagation',
        'private',
        '--',
        '/bin/sh',
        '-c',
        'mount -t tmpfs -o size=1m vsp-tiny-store "$0" && exec "$@"',
        store,
        cmd,
        ...args,
      ],
    }));
    try {
      const big = path.join(tmp, 'big.bin');
      await fs.writeFile(big, Buffer.alloc(4 << 20, 7));
      await fx.repo('alice').upload('alice', 'big/input.bin', big);
      const started = Date.now();
      const { taskId } = await fx.vsp.submit({
        owner: 'alice',
        host: 'b',
        inputs: ['big/input.bin'],
        command: 'true',
      });
      const err = await fx.vsp.result(taskId).catch((e: unknown) => e);
      const elapsedMs = Date.now() - started;
      process.stderr.write(`\nFIGURE full store: task failed after ${elapsedMs} ms\n`);
      expect(err).toBeInstanceOf(WorkflowFailedError);
      expect(taskFailureMessage(err)).toContain('No space left on device');
      let type: string | undefined;
      for (let e: unknown = err; e instanceof Error; e = e.cause)
        type = (e as { type?: string }).type ?? type;
      expect(type).toBe('StoreFull');
      // One attempt, failed as non-retryable: no retry buried the cause.
      const events = (await fx.temporal.workflow.getHandle(taskId).fetchHistory()).events ?? [];
      const scheduled = events.find(
        (e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'stageIn',
      );
      const ofStageIn = (
        e: (typeof events)[number],
        attrs: { scheduledEventId?: unknown } | null | undefined,
      ) =>
        attrs !== undefined &&
        attrs !== null &&
        String(attrs.scheduledEventId) === String(scheduled?.eventId) &&
        e;
      const startedEvent = events.find((e) => ofStageIn(e, e.activityTaskStartedEventAttributes));
      const failedEvent = events.find((e) => ofStageIn(e, e.activityTaskFailedEventAttributes));
      expect(startedEvent?.activityTaskStartedEventAttributes?.attempt).toBe(1);
      expect(failedEvent?.activityTaskFailedEventAttributes?.retryState).toBe(
        temporal.api.enums.v1.RetryState.RETRY_STATE_NON_RETRYABLE_FAILURE,
      );
      const left = execFileSync(
        'nsenter',
        ['-t', String(tiny.pid), '-m', '--', 'ls', '-A', path.join(store, 'vms')],
        {
          encoding: 'utf8',
        },
      );
      expect(left.trim()).toBe('');
    } finally {
      await fx.cluster.killHost('b');
      await fx.cluster.startHost('b');
    }
  },
);
