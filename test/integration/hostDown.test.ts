import { promises as fs } from 'node:fs';
import path from 'node:path';
import { WorkflowFailedError } from '@temporalio/client';
import { taskFailureMessage } from '../../client/vspClient';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';

/**
 * A host that dies for good, with the hosts' default liveness (30 s) and the workflow's default
 * timeouts: its running task fails with HostDown naming it within about two liveness periods, and a task
 * whose spec says `onHostFailure: 'restart'` starts again on the live host and completes there.
 */
const LIVENESS_SEC = 30;

let fx: ClusterFixture;

beforeAll(async () => {
  fx = await startClusterFixture({ hosts: ['a', 'b'], owners: ['alice'] });
}, 180_000);

afterAll(async () => {
  await fx?.stop();
});

/** Waits for a file named `go` in its home, which the test drops there: no timing assumption. */
const WAITING = 'while [ ! -e go ]; do sleep 0.1; done; mkdir -p out; echo done > out/r.txt';

/** The homes of the VMs on `host` (its VM store). */
async function homesOn(host: string): Promise<string[]> {
  const vms = path.join(fx.cluster.storeDir(host), 'vms');
  const all = await fs.readdir(vms).catch(() => [] as string[]);
  const homes = all.map((vm) => path.join(vms, vm, 'home'));
  const present = await Promise.all(
    homes.map((h) =>
      fs.stat(h).then(
        () => h,
        () => undefined,
      ),
    ),
  );
  return present.filter((h): h is string => h !== undefined);
}

test('a host killed for good: HostDown within two liveness periods; a restart task completes elsewhere', async () => {
  const failing = await fx.cluster.submitTask('alice', { driver: 'process', host: 'b', command: WAITING });
  const restarting = await fx.cluster.submitTask('alice', {
    driver: 'process',
    host: 'b',
    onHostFailure: 'restart',
    command: WAITING,
  });
  for (const { taskId } of [failing, restarting])
    await until(`${taskId} running on b`, async () => {
      const s = await fx.vsp.status(taskId);
      return s.phase === 'running' && s.host === 'b';
    });

  const killedAt = Date.now();
  await fx.cluster.killHost('b');
  const err = await fx.vsp.result(failing.taskId).catch((e: unknown) => e);
  const detectMs = Date.now() - killedAt;
  process.stderr.write(
    `\nFIGURE task failed with HostDown ${detectMs} ms after its host died (liveness ${LIVENESS_SEC} s)\n`,
  );
  expect(err).toBeInstanceOf(WorkflowFailedError);
  expect(taskFailureMessage(err)).toMatch(/host b is down/);
  expect(((err as WorkflowFailedError).cause as { type?: string }).type).toBe('HostDown');
  expect(detectMs).toBeLessThanOrEqual(2 * LIVENESS_SEC * 1000);
  const failed = await fx.vsp.status(failing.taskId);
  expect(failed).toMatchObject({ phase: 'failed', host: 'b' });

  // The other task starts again on a (from stage-in) and completes there.
  const home = await until('the restarted task running on a', async () => {
    const s = await fx.vsp.status(restarting.taskId);
    const [h] = await homesOn('a');
    return s.phase === 'running' && s.host === 'a' && h ? h : undefined;
  });
  await fs.writeFile(path.join(home, 'go'), '');
  const result = await fx.vsp.result(restarting.taskId);
  expect(result).toMatchObject({ exitCode: 0, host: 'a' });
  expect(result.outputs.map((o) => path.basename(o.path))).toEqual(['r.txt']);
  expect((await fx.vsp.status(restarting.taskId)).restartedFrom).toEqual(['b']);

  // Back again, host b's reaper stops what the dead worker left (both tasks are closed by now).
  await fx.cluster.startHost('b');
  await until('host b has no VM left', async () => (await homesOn('b')).length === 0, 120_000);
}, 240_000);
