import { readFileSync } from 'node:fs';
import path from 'node:path';
import { createControlActivities } from '../../activities/control/createControlActivities';
import { taskFailureMessage } from '../../client/vspClient';
import { FaultCluster, failureTypes, poll, recordFigure, sha256 } from '../support/faultCluster';

/**
 * A host killed for good (issue 10, Acceptance): its task fails within two liveness periods with HostDown
 * naming the host, no new task is placed on it, and when it comes back its orphan (the task's process and
 * folder, whose workflow has ended) is reaped. A short liveness period keeps the test quick.
 */
const LIVENESS_SEC = 10;
const HEARTBEAT_SEC = 2;

let fc: FaultCluster;

beforeAll(async () => {
  fc = await FaultCluster.start({
    hosts: ['a', 'b'],
    controlEnv: { VSP_HOST_LIVENESS_SEC: String(LIVENESS_SEC) },
    // Each host says it lives well within the liveness period.
    hostEnv: { VSP_HOST_HEARTBEAT_SEC: String(HEARTBEAT_SEC) },
  });
}, 180_000);

afterAll(async () => {
  await fc?.stop();
});

test('a host killed for good: HostDown within two liveness periods, nothing placed there, orphan reaped on return', async () => {
  const name = 'dead-host';
  const taskId = await fc.submit('dead-host', { host: 'a', command: fc.taskCommand(name) });
  await fc.untilStarted(taskId);
  const vmId = path.basename((await fc.vmDir(taskId)) ?? '');
  const marker = `'${name}'`;

  await fc.cluster.killHost('a');
  const killed = Date.now();
  // Submitted at once, while the dead host's last heartbeat is recent: it may be placed there, and must
  // then fail with HostDown rather than wait (or complete on b).
  const early = await fc.submit('early', { command: fc.taskCommand('early', false) });
  const outcome = fc.vsp.result(early).then(
    (r) => ({ host: r.host, types: [] as string[] }),
    (e: unknown) => ({ host: 'a', types: failureTypes(e) }),
  );

  // Once placement counts the host down (the system's own verdict, within its liveness period), nothing
  // new goes there.
  const control = createControlActivities({
    client: fc.temporal,
    hosts: ['a', 'b'],
    hostLivenessSec: LIVENESS_SEC,
  });
  await poll('placement to count host a down', 60_000, async () =>
    (await control.hostStatus('a')).live ? undefined : true,
  );
  const downMs = Date.now() - killed;
  recordFigure('time until placement counts a killed host down', downMs / 1000, 's');
  const later = ['after-down-0', 'after-down-1', 'after-down-2'];
  const laterIds = await Promise.all(later.map((n) => fc.submit(n, { command: fc.taskCommand(n, false) })));

  const err = await fc.vsp.result(taskId).then(
    () => undefined,
    (e: unknown) => e,
  );
  const detectMs = Date.now() - killed;
  recordFigure('time to detect a dead host (its task failed with HostDown)', detectMs / 1000, 's');
  expect(failureTypes(err)).toContain('HostDown');
  expect(taskFailureMessage(err)).toMatch(/\ba\b/);
  expect((await fc.status(taskId)).phase).toBe('failed');

  for (const [i, id] of laterIds.entries()) {
    const r = await fc.vsp.result(id);
    expect({ task: later[i], host: r.host }).toEqual({ task: later[i], host: 'b' });
    expect(r.outputs.find((o) => o.path.endsWith('outputs/runs.txt'))?.sha256).toBe(sha256('run\n'));
  }
  const placedEarly = await outcome;
  recordFigure('a task submitted right after the kill', JSON.stringify(placedEarly));
  if (placedEarly.host === 'a') expect(placedEarly.types).toContain('HostDown');

  // The task's process outlived its worker, as a VM would: it is the orphan the host finds on return.
  expect(fc.processesWith(marker)).not.toEqual([]);
  await fc.cluster.startHost('a');
  const back = Date.now();
  await poll('the orphan to be reaped', 120_000, async () =>
    (await fc.storeLeftovers()).length === 0 && fc.processesWith(marker).length === 0 ? true : undefined,
  );
  recordFigure('orphan reaped after the dead host returned', (Date.now() - back) / 1000, 's');
  const hostLog = readFileSync(path.join(fc.cluster.logDir, 'host-a.log'), 'utf8');
  // Every reaper action is audited in the worker log, naming the VM.
  expect(hostLog).toMatch(new RegExp(`"vmId":"${vmId}".*(reap|orphan)`, 'i'));
  // Last, so that every other property is checked whatever the times.
  expect(downMs).toBeLessThanOrEqual(2 * LIVENESS_SEC * 1000);
  expect(detectMs).toBeLessThanOrEqual(2 * LIVENESS_SEC * 1000);
}, 300_000);
