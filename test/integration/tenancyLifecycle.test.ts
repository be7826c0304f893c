import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { setOwnerDisabled } from '../../repository/accounts/admin';
import type { AuditEvent } from '../../repository/accounts/auditLog';
import { decodeCapabilityClaims } from '../../spec/capability';
import type { TaskResult } from '../../workflows/definitions';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';
import { releaseTask, waitingCommand } from '../support/releasedTasks';
import { capabilityOf } from '../support/taskApi';

/**
 * Tenancy end to end (issue 9) on a local cluster (real Temporal, repository, control and process-driver
 * host workers): a task submitted through the owners' task API reaches the repository only with its
 * capability, which stops working when the task ends; a disabled owner's running task loses access at once.
 */

let fx: ClusterFixture;
let token: string;

beforeAll(async () => {
  fx = await startClusterFixture({ hosts: ['a'], owners: ['alice'] });
  token = fx.cluster.ownerTokens.get('alice')!;
  await fx.repo('alice').upload('alice', 'in/x.txt', Readable.from([Buffer.from('tenant data\n')]));
}, 180_000);

afterAll(async () => {
  await fx?.stop();
});

async function api(
  method: string,
  p: string,
  json?: unknown,
): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${fx.cluster.repositoryUrl}/v1/owners/alice/tasks${p}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: json === undefined ? undefined : JSON.stringify(json),
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

async function readWith(capability: string, p: string): Promise<{ status: number; text: string }> {
  const res = await fetch(`${fx.cluster.repositoryUrl}/v1/owners/alice/files/${p}`, {
    headers: { Authorization: `Bearer ${capability}` },
  });
  return { status: res.status, text: await res.text() };
}

async function audit(): Promise<AuditEvent[]> {
  const text = await fs.readFile(path.join(fx.cluster.repoDir, 'audit.log'), 'utf8');
  return text
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as AuditEvent);
}

test('a task runs with its own capability only, and the capability ends with the task', async () => {
  const submitted = await api('POST', '', {
    command: 'mkdir -p out && cat in/x.txt > out/copy.txt',
    inputs: ['in/x.txt'],
    driver: 'process',
  });
  expect(submitted.status).toBe(201);
  const taskId = submitted.body.taskId as string;
  const result = await until(
    `task ${taskId} to end`,
    async () => {
      const r = await api('GET', `/${encodeURIComponent(taskId)}/result`);
      if (r.status === 409) return undefined;
      return r;
    },
    120_000,
  );
  expect(result.status).toBe(200);
  const done = result.body as unknown as TaskResult;
  expect(done.resultsPath).toBe(`results/${taskId}`);
  expect(done.outputs.map((o) => o.path)).toEqual([`results/${taskId}/outputs/copy.txt`]);

  const capability = await capabilityOf(fx, taskId);
  const { id } = decodeCapabilityClaims(capability);
  const lines = await audit();
  // Every transfer of the task went with its capability: the input read, the outputs and logs written.
  const byTask = lines.filter((e) => e.task === taskId && e.user === `capability:${id}`);
  expect(byTask).toContainEqual(
    expect.objectContaining({ action: 'download', path: 'in/x.txt', result: 'ok' }),
  );
  expect(byTask).toContainEqual(
    expect.objectContaining({ action: 'upload', path: `results/${taskId}/outputs/copy.txt`, result: 'ok' }),
  );
  expect(byTask).toContainEqual(expect.objectContaining({ action: 'capability-revoke', result: 'ok' }));
  // Reused after its task ended: refused.
  expect(await readWith(capability, 'in/x.txt')).toEqual({
    status: 401,
    text: JSON.stringify({ error: 'capability has been revoked' }),
  });
  // The host's own token read nothing of alice's.
  expect(
    lines.filter((e) => e.user?.startsWith('service:') && e.owner === 'alice' && e.result === 'ok'),
  ).toEqual([]);
});

test("a disabled owner's running task loses repository access at once", async () => {
  const marker = `disabled-${Date.now().toString(36)}`;
  const submitted = await api('POST', '', { command: waitingCommand(marker), driver: 'process' });
  expect(submitted.status).toBe(201);
  const taskId = submitted.body.taskId as string;
  try {
    await until(
      `task ${taskId} running`,
      async () => (await api('GET', `/${encodeURIComponent(taskId)}`)).body.phase === 'running',
      120_000,
    );
    const capability = await capabilityOf(fx, taskId);
    expect((await readWith(capability, `results/${taskId}/none`)).status).toBe(404);
    await setOwnerDisabled(fx.cluster.repoDir, 'alice', true);
    expect(await readWith(capability, `results/${taskId}/none`)).toEqual({
      status: 401,
      text: JSON.stringify({ error: 'owner alice is disabled' }),
    });
    await until('the task released', () => releaseTask(fx.cluster.storeDir('a'), marker).then(() => true));
    // The host's stage-out is refused: the outputs do not reach the disabled owner's space.
    await until(
      'the stage-out refused',
      async () =>
        (await audit()).some(
          // Any refused write (whole or resumable upload); the test's own check above was a download.
          (e) => e.task === taskId && e.result === 'denied' && e.action !== 'download',
        ),
      120_000,
    );
    const { id } = decodeCapabilityClaims(capability);
    expect(
      (await audit()).filter(
        (e) => e.user === `capability:${id}` && e.action === 'upload' && e.result === 'ok',
      ),
    ).toEqual([]);
  } finally {
    await setOwnerDisabled(fx.cluster.repoDir, 'alice', false);
    await fx.temporal.workflow
      .getHandle(taskId)
      .terminate('test cleanup')
      .catch(() => undefined);
  }
});
