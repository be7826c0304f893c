import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { WorkflowFailedError } from '@temporalio/client';
import { temporal } from '@temporalio/proto';
import { taskFailureMessage } from '../../client/vspClient';
import { startClusterFixture, type ClusterFixture } from '../support/clusterFixture';

/**
 * Fault: the VM store is full. A host worker whose store is a 1 MiB tmpfs (in a mount namespace of its
 * own, so nothing is mounted outside and the mount goes with the worker) gets a task with a 4 MiB input:
 * the task fails at once with StoreFull, `No space left on device` first, without retries, and the
 * store keeps nothing of it.
 */
let fx: ClusterFixture;
let tmp: string;

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-store-full-'));
  fx = await startClusterFixture({ hosts: ['b'], owners: ['alice'] });
}, 180_000);

afterAll(async () => {
  await fx?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

const rootOnly = process.getuid?.() === 0 ? test : test.skip;
if (process.getuid?.() !== 0)
  process.stderr.write('storeFull: skipped, mounting a tmpfs in a namespace needs root\n');

rootOnly(
  'a full VM store fails the task at once with StoreFull and its first cause, leaving nothing',
  async () => {
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
      const { taskId } = await fx.cluster.submitTask('alice', {
        driver: 'process',
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
    }
  },
);
