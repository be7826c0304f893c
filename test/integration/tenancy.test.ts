import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { Client, Connection, WorkflowNotFoundError } from '@temporalio/client';
import { VspClient } from '../../client/vspClient';
import {
  addOwner,
  createServiceToken,
  setOwnerDisabled,
  setQuota,
  withAdmin,
} from '../../repository/accounts/admin';
import type { AuditEvent } from '../../repository/accounts/auditLog';
import { authenticatePassword } from '../../repository/accounts/auth';
import { loadCapabilityKeys, mintCapability } from '../../repository/accounts/capabilities';
import { RepositoryClient } from '../../repository/client';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';
import { taskApiOver } from '../../repository/http/taskApi';
import { decodeCapabilityClaims, type CapabilityClaims } from '../../spec/capability';
import { parseTaskInput } from '../../spec/taskInput';
import { runAdminCli } from '../support/adminCli';
import { temporalAddress } from '../support/temporalEnv';

/**
 * Tenancy at the repository (issue 9): owners act only through the authenticated task API, a task's
 * capability reaches only that task's files, and pre-flight refuses a task before anything starts.
 * Real repository and Temporal server; no workers poll, so a started task stays where it was started
 * (and is terminated at the end, so no later test's worker picks it up).
 */

let dataDir: string;
let server: RepositoryServer;
let connection: Connection;
let temporal: Client;
let tokens: Record<'alice' | 'bob' | 'carol', string>;
let serviceToken: string;
let adminToken: string;
const started: string[] = [];
const run = `${process.pid}-${Date.now().toString(36)}`;

interface Reply {
  status: number;
  body: Record<string, unknown>;
}

async function call(
  method: string,
  target: string,
  opts: { token?: string; json?: unknown; body?: Buffer } = {},
): Promise<Reply> {
  const headers: Record<string, string> = {};
  if (opts.token) headers.Authorization = `Bearer ${opts.token}`;
  let body: string | Buffer | undefined = opts.body;
  if (opts.json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(opts.json);
  }
  const res = await fetch(`${server.url}${target}`, { method, headers, body });
  const text = await res.text();
  const json = res.headers.get('content-type')?.startsWith('application/json') && text !== '';
  return { status: res.status, body: json ? (JSON.parse(text) as Record<string, unknown>) : { text } };
}

async function auditLines(): Promise<AuditEvent[]> {
  const text = await fs.readFile(path.join(dataDir, 'audit.log'), 'utf8');
  return text
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as AuditEvent);
}

/** An audit line with these fields (lines of concurrent requests may land in either order). */
const audited = (fields: Partial<AuditEvent>) => expect.objectContaining(fields) as AuditEvent;

async function workflowExists(taskId: string): Promise<boolean> {
  try {
    await temporal.workflow.getHandle(taskId).describe();
    return true;
  } catch (err) {
    if (err instanceof WorkflowNotFoundError) return false;
    throw err;
  }
}

/** Submits through the API as `owner` (process driver unless named); records started tasks for cleanup. */
async function submit(owner: keyof typeof tokens, given: Record<string, unknown>, taskId?: string) {
  const spec = { driver: 'process', ...given };
  const r = await call('POST', `/v1/owners/${owner}/tasks`, {
    token: tokens[owner],
    json: taskId === undefined ? spec : { spec, taskId },
  });
  if (r.status === 201) started.push(r.body.taskId as string);
  return r;
}

/** The capability a started task's workflow received, from its first history event. */
async function capabilityOf(
  taskId: string,
): Promise<{ token: string; claims: CapabilityClaims; input: unknown }> {
  const history = await temporal.workflow.getHandle(taskId).fetchHistory();
  const attrs = history.events![0].workflowExecutionStartedEventAttributes!;
  const payload = attrs.input!.payloads![0];
  const input = JSON.parse(Buffer.from(payload.data!).toString('utf8')) as unknown;
  const parsed = parseTaskInput(input);
  return { token: parsed.capability, claims: decodeCapabilityClaims(parsed.capability), input };
}

const fileTarget = (owner: string, p: string) =>
  `/v1/owners/${owner}/files/${p.split('/').map(encodeURIComponent).join('/')}`;

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-tenancy-'));
  tokens = {
    alice: (await addOwner(dataDir, 'alice')).token,
    bob: (await addOwner(dataDir, 'bob')).token,
    carol: (await addOwner(dataDir, 'carol')).token,
  };
  serviceToken = await createServiceToken(dataDir, 'hosts');
  adminToken = (await withAdmin(dataDir, (a) => a.createAdminToken('ops'))).token;
  connection = await Connection.connect({ address: temporalAddress() });
  temporal = new Client({ connection, namespace: 'default' });
  server = await startRepositoryServer({
    dataDir,
    port: 0,
    tasks: taskApiOver(new VspClient(temporal)),
    // Many refusals on purpose, all from loopback: not a guesser to lock out.
    loginThrottle: { maxFailuresPerAddress: 1000 },
  });
  for (const [owner, p, text] of [
    ['alice', 'in/a.txt', 'alice input a'],
    ['alice', 'in/b.txt', 'alice input b'],
    ['alice', 'private/secret.txt', 'alice secret'],
    ['alice', 'taken/x.txt', 'already there'],
    ['alice', 'afile', 'a file, not a folder'],
    ['bob', 'in/bob.txt', 'bob input'],
    ['bob', 'images/bob.qcow2', 'not really an image'],
  ] as const) {
    await new RepositoryClient({ url: server.url, token: tokens[owner] }).upload(
      owner,
      p,
      Readable.from([Buffer.from(text)]),
    );
  }
});

afterAll(async () => {
  for (const id of started)
    await temporal.workflow
      .getHandle(id)
      .terminate('test cleanup')
      .catch(() => undefined);
  await server?.close();
  await connection?.close();
  await fs.rm(dataDir, { recursive: true, force: true });
});

describe('the task API is the owners front door', () => {
  test('a submission runs as the authenticated owner, with a capability scoped to its task', async () => {
    const taskId = `ok-${run}`;
    const r = await submit('alice', { command: 'cat in/a.txt', inputs: ['in/a.txt'] }, taskId);
    expect(r).toEqual({
      status: 201,
      body: { taskId, runId: expect.any(String), resultsPath: `results/${taskId}` },
    });
    const { claims, input } = await capabilityOf(taskId);
    expect(input).toMatchObject({ v: 1, spec: { owner: 'alice', resultsPath: `results/${taskId}` } });
    expect(claims).toMatchObject({
      owner: 'alice',
      taskId,
      read: ['in/a.txt'],
      results: `results/${taskId}`,
    });
    expect(claims.image).toBeUndefined();
    // Time limit (default 3600 s) + the 8-day margin.
    expect(claims.exp - Date.now() / 1000).toBeGreaterThan(3600 + 8 * 24 * 3600 - 60);
    // The audit log names the task; no secret reaches it.
    const log = await fs.readFile(path.join(dataDir, 'audit.log'), 'utf8');
    expect(log).not.toContain('vspcap_');
    expect(log).not.toContain(tokens.alice);
  });

  test('a spec naming another owner is refused (403, audited) and nothing starts', async () => {
    const taskId = `impersonate-${run}`;
    const r = await submit(
      'alice',
      { owner: 'bob', command: 'cat in/bob.txt', inputs: ['in/bob.txt'] },
      taskId,
    );
    expect(r).toEqual({ status: 403, body: { error: expect.stringMatching(/spec.owner "bob"/) } });
    expect(await auditLines()).toContainEqual(
      audited({ user: 'alice', action: 'task-submit', result: 'denied' }),
    );
    expect(await workflowExists(taskId)).toBe(false);
    // Nor through bob's path with alice's token.
    const asBob = await call('POST', '/v1/owners/bob/tasks', {
      token: tokens.alice,
      json: { command: 'id' },
    });
    expect(asBob.status).toBe(403);
    expect(await auditLines()).toContainEqual(audited({ user: 'alice', owner: 'bob', result: 'denied' }));
  });

  test("another owner's tasks can be neither listed, seen, cancelled, migrated nor read", async () => {
    const bobTask = `bob-task-${run}`;
    expect((await submit('bob', { command: 'sleep 1' }, bobTask)).status).toBe(201);
    expect((await call('GET', '/v1/owners/bob/tasks', { token: tokens.alice })).status).toBe(403);
    expect(await auditLines()).toContainEqual(
      audited({
        user: 'alice',
        owner: 'bob',
        action: 'task-list',
        result: 'denied',
      }),
    );
    for (const [method, suffix] of [
      ['GET', ''],
      ['POST', '/cancel'],
      ['POST', '/migrate'],
      ['GET', '/result'],
    ]) {
      // Through alice's own path: answered as a task that does not exist, audited as denied.
      const own = await call(method, `/v1/owners/alice/tasks/${bobTask}${suffix}`, { token: tokens.alice });
      expect([suffix, own.status, own.body.error]).toEqual([suffix, 404, `no such task: ${bobTask}`]);
      expect(await auditLines()).toContainEqual(
        audited({ user: 'alice', path: `task:${bobTask}`, result: 'denied' }),
      );
      expect(
        (await call(method, `/v1/owners/bob/tasks/${bobTask}${suffix}`, { token: tokens.alice })).status,
      ).toBe(403);
    }
    const listed = await call('GET', '/v1/owners/alice/tasks', { token: tokens.alice });
    expect(listed.status).toBe(200);
    expect((listed.body.tasks as { taskId: string }[]).map((t) => t.taskId)).not.toContain(bobTask);
    // Bob's own view has it.
    const bobs = await call('GET', '/v1/owners/bob/tasks?limit=5', { token: tokens.bob });
    expect((bobs.body.tasks as { taskId: string }[]).map((t) => t.taskId)).toContain(bobTask);
  });

  test('cancel, migrate and result of an ended task answer 409 and 422 with the cause', async () => {
    const taskId = `ended-${run}`;
    expect((await submit('alice', { command: 'true' }, taskId)).status).toBe(201);
    await temporal.workflow.getHandle(taskId).terminate('ended by the test');
    const base = `/v1/owners/alice/tasks/${taskId}`;
    const cancel = await call('POST', `${base}/cancel`, { token: tokens.alice, json: { reason: 'x' } });
    expect(cancel).toEqual({
      status: 409,
      body: { error: expect.stringMatching(/already ended \(TERMINATED\)/) },
    });
    expect((await call('POST', `${base}/migrate`, { token: tokens.alice })).status).toBe(409);
    const result = await call('GET', `${base}/result`, { token: tokens.alice });
    expect(result).toEqual({
      status: 422,
      body: { error: expect.stringMatching(/ended by the test|terminated/i) },
    });
    const bad = await call('POST', `${base}/migrate`, { token: tokens.alice, json: { host: 'Not A Host' } });
    expect(bad.status).toBe(400);
  });

  test('whoami names each kind of credential', async () => {
    expect((await call('GET', '/v1/whoami', { token: tokens.alice })).body).toEqual({
      kind: 'owner',
      owner: 'alice',
    });
    expect((await call('GET', '/v1/whoami', { token: serviceToken })).body).toEqual({ kind: 'service' });
    expect((await call('GET', '/v1/whoami', { token: adminToken })).body).toEqual({ kind: 'admin' });
    expect((await call('GET', '/v1/whoami')).status).toBe(401);
  });
});

describe('a task capability reaches only its own task', () => {
  let cap: string;
  let claims: CapabilityClaims;
  const taskId = `capable-${run}`;

  beforeAll(async () => {
    expect((await submit('alice', { command: 'cat in/a.txt', inputs: ['in/a.txt'] }, taskId)).status).toBe(
      201,
    );
    ({ token: cap, claims } = await capabilityOf(taskId));
  });

  async function expectDenied(method: string, target: string, body?: Buffer, json?: unknown): Promise<void> {
    const r = await call(method, target, { token: cap, body, json });
    expect([method, target, r.status]).toEqual([method, target, 403]);
    expect(await auditLines()).toContainEqual(
      audited({
        user: `capability:${claims.id}`,
        task: taskId,
        result: 'denied',
      }),
    );
  }

  test('its inputs and results: yes; anything else: 403, audited with the capability and task', async () => {
    expect((await call('GET', fileTarget('alice', 'in/a.txt'), { token: cap })).status).toBe(200);
    const out = `results/${taskId}/outputs/o.txt`;
    expect(
      (await call('PUT', fileTarget('alice', out), { token: cap, body: Buffer.from('out') })).status,
    ).toBe(201);
    expect((await call('GET', fileTarget('alice', out), { token: cap })).status).toBe(200);
    const listed = await call('GET', `/v1/owners/alice/files?prefix=results/${taskId}/`, { token: cap });
    expect(listed.status).toBe(200);
    const upload = await call('POST', '/v1/owners/alice/uploads', {
      token: cap,
      json: { path: `results/${taskId}/logs/task.log`, size: 3 },
    });
    expect(upload.status).toBe(201);
    expect((await call('DELETE', fileTarget('alice', out), { token: cap })).status).toBe(204);
    expect((await call('GET', '/v1/whoami', { token: cap })).body).toEqual({
      kind: 'capability',
      owner: 'alice',
      taskId,
    });

    await expectDenied('GET', fileTarget('alice', 'in/b.txt'));
    await expectDenied('GET', fileTarget('alice', 'private/secret.txt'));
    await expectDenied('PUT', fileTarget('alice', 'in/a.txt'), Buffer.from('overwritten'));
    await expectDenied('PUT', fileTarget('alice', `results/${taskId}-other/x`), Buffer.from('x'));
    await expectDenied('DELETE', fileTarget('alice', 'in/a.txt'));
    await expectDenied('GET', '/v1/owners/alice/files');
    // A string prefix of its results folder would also list results/<taskId>-other/.
    await expectDenied('GET', `/v1/owners/alice/files?prefix=results/${taskId}`);
    await expectDenied('POST', '/v1/owners/alice/uploads', undefined, { path: 'elsewhere.bin', size: 1 });
    await expectDenied('GET', '/v1/owners/alice/tasks');
    await expectDenied('GET', '/v1/owners/alice/images');
    await expectDenied('GET', fileTarget('bob', 'in/bob.txt'));
    expect(await fs.readFile(path.join(dataDir, 'files', 'alice', 'in', 'a.txt'), 'utf8')).toBe(
      'alice input a',
    );
  });

  test('SFTP and FTPS do not take a capability for a login', async () => {
    await expect(
      withAdmin(dataDir, (_a, db) => authenticatePassword(db, 'alice', cap)),
    ).rejects.toMatchObject({ status: 401 });
  });

  test("another task's capability cannot read this task's inputs", async () => {
    const other = `other-${run}`;
    expect((await submit('alice', { command: 'cat in/b.txt', inputs: ['in/b.txt'] }, other)).status).toBe(
      201,
    );
    const otherCap = (await capabilityOf(other)).token;
    expect((await call('GET', fileTarget('alice', 'in/b.txt'), { token: otherCap })).status).toBe(200);
    const r = await call('GET', fileTarget('alice', 'in/a.txt'), { token: otherCap });
    expect(r).toEqual({ status: 403, body: { error: expect.stringMatching(`task ${other}'s capability`) } });
    expect(await auditLines()).toContainEqual(audited({ task: other, path: 'in/a.txt', result: 'denied' }));
  });

  test('a forged capability is refused (401, audited under the id it claims)', async () => {
    const [payload, sig] = cap.slice('vspcap_'.length).split('.');
    const badSig = `vspcap_${payload}.${Buffer.from('x'.repeat(32)).toString('base64url')}`;
    // Claims widened to bob's space and every path, the signature kept.
    const widened = Buffer.from(
      JSON.stringify({ ...claims, owner: 'bob', read: ['in/bob.txt'] }),
      'utf8',
    ).toString('base64url');
    for (const forged of [badSig, `vspcap_${widened}.${sig}`]) {
      const r = await call('GET', fileTarget('bob', 'in/bob.txt'), { token: forged });
      expect(r).toEqual({ status: 401, body: { error: 'capability signature is invalid' } });
      expect(await auditLines()).toContainEqual(
        audited({
          user: `capability:${claims.id}`,
          task: taskId,
          result: 'denied',
        }),
      );
    }
    // Signed with another repository's key.
    const otherDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-tenancy-other-'));
    try {
      const foreign = await mint(claims.exp, otherDir);
      expect((await call('GET', fileTarget('alice', 'in/a.txt'), { token: foreign.token })).status).toBe(401);
    } finally {
      await fs.rm(otherDir, { recursive: true, force: true });
    }
  });

  /** A capability for this task minted directly (same database), signed with `keysDir`'s key. */
  async function mint(exp: number, keysDir = dataDir) {
    const grant = { owner: 'alice', taskId, read: ['in/a.txt'], results: `results/${taskId}`, exp };
    return await withAdmin(dataDir, (_a, db) =>
      mintCapability(db, loadCapabilityKeys(keysDir), grant, 'test'),
    );
  }

  test('an expired capability is refused', async () => {
    const expired = await mint(Math.floor(Date.now() / 1000) - 1);
    const r = await call('GET', fileTarget('alice', 'in/a.txt'), { token: expired.token });
    expect(r).toEqual({ status: 401, body: { error: expect.stringMatching(/capability expired at/) } });
    expect(await auditLines()).toContainEqual(
      audited({ user: `capability:${expired.claims.id}`, result: 'denied' }),
    );
  });

  test("a disabled owner's running task loses access at once, and gets it back when re-enabled", async () => {
    expect((await call('GET', fileTarget('alice', 'in/a.txt'), { token: cap })).status).toBe(200);
    await setOwnerDisabled(dataDir, 'alice', true);
    try {
      const r = await call('GET', fileTarget('alice', 'in/a.txt'), { token: cap });
      expect(r).toEqual({ status: 401, body: { error: 'owner alice is disabled' } });
      expect(await auditLines()).toContainEqual(
        audited({
          user: `capability:${claims.id}`,
          task: taskId,
          result: 'denied',
        }),
      );
    } finally {
      await setOwnerDisabled(dataDir, 'alice', false);
    }
    expect((await call('GET', fileTarget('alice', 'in/a.txt'), { token: cap })).status).toBe(200);
  });

  test('a revoked capability (its task ended) is refused on every later use', async () => {
    expect((await call('DELETE', '/v1/capabilities/self', { token: tokens.alice })).status).toBe(403);
    expect((await call('DELETE', '/v1/capabilities/self', { token: cap })).status).toBe(204);
    expect(await auditLines()).toContainEqual(
      audited({ action: 'capability-revoke', task: taskId, result: 'ok' }),
    );
    for (const [method, target] of [
      ['GET', fileTarget('alice', 'in/a.txt')],
      ['PUT', fileTarget('alice', `results/${taskId}/late.txt`)],
      ['DELETE', '/v1/capabilities/self'],
    ]) {
      const r = await call(method, target, {
        token: cap,
        body: method === 'PUT' ? Buffer.from('x') : undefined,
      });
      expect([method, r.status, r.body.error]).toEqual([method, 401, 'capability has been revoked']);
    }
  });
});

describe('service tokens', () => {
  test("the hosts' token reads nothing of any owner (403, audited)", async () => {
    for (const [method, target] of [
      ['GET', fileTarget('alice', 'in/a.txt')],
      ['PUT', fileTarget('alice', 'results/x/y')],
      ['GET', '/v1/owners/alice/files'],
      ['POST', '/v1/owners/alice/uploads'],
      ['GET', '/v1/owners/alice/tasks'],
    ]) {
      const r = await call(method, target, {
        token: serviceToken,
        json: method === 'POST' ? { path: 'results/x/z', size: 1 } : undefined,
        body: method === 'PUT' ? Buffer.from('x') : undefined,
      });
      expect([method, target, r.status]).toEqual([method, target, 403]);
      expect(await auditLines()).toContainEqual(
        audited({ user: expect.stringMatching(/^service:/), result: 'denied' }),
      );
    }
  });
});

describe('pre-flight: refused at submission, nothing started', () => {
  const cases: [string, keyof typeof tokens, Record<string, unknown>, number, RegExp][] = [
    [
      'missing input',
      'alice',
      { command: 'x', inputs: ['in/a.txt', 'in/none.txt'] },
      404,
      /^inputs\[1\]: in\/none.txt is not in alice's space/,
    ],
    ['folder input', 'alice', { command: 'x', inputs: ['in'] }, 404, /^inputs\[0\]: in is a folder/],
    [
      'duplicate inputs',
      'alice',
      { command: 'x', inputs: ['in/a.txt', 'in/a.txt'] },
      400,
      /inputs\.1: duplicate of inputs\[0\]/,
    ],
    [
      'duplicate ports',
      'alice',
      { command: 'x', ports: [8080, 8080] },
      400,
      /ports\.1: duplicate of ports\[0\]/,
    ],
    [
      "another owner's image",
      'alice',
      { command: 'x', image: 'images/bob.qcow2' },
      404,
      /^image: images\/bob.qcow2 is not in alice's space/,
    ],
    [
      'missing base image',
      'alice',
      { command: 'x', image: 'base:none' },
      404,
      /^image: the provider has no base image none/,
    ],
    [
      'results path is a file',
      'alice',
      { command: 'x', resultsPath: 'afile' },
      409,
      /^resultsPath: afile is an existing file/,
    ],
    [
      'results path under a file',
      'alice',
      { command: 'x', resultsPath: 'afile/r' },
      409,
      /^resultsPath: afile is a file/,
    ],
    [
      'results path holds files',
      'alice',
      { command: 'x', resultsPath: 'taken' },
      409,
      /^resultsPath: taken already holds 1 file/,
    ],
    [
      'results path under base-images/',
      'alice',
      { command: 'x', resultsPath: 'base-images/r' },
      403,
      /^resultsPath: base-images\/ is the provider's/,
    ],
    [
      'over quota',
      'carol',
      { command: 'x', outputRoomMiB: 2 },
      413,
      /^outputRoomMiB: 2 MiB of outputs would not fit in carol's quota/,
    ],
    ['an invalid spec', 'alice', { command: '' }, 400, /command: command is empty/],
  ];

  beforeAll(() => setQuota(dataDir, 'carol', { bytes: 1024 * 1024 }));

  test.each(cases)('%s', async (_what, owner, spec, status, why) => {
    const taskId = `refused-${started.length}-${Math.random().toString(36).slice(2, 8)}`;
    const r = await submit(owner, spec, taskId);
    expect(r).toEqual({ status, body: { error: expect.stringMatching(why) } });
    expect(await auditLines()).toContainEqual(
      audited({
        user: owner,
        action: 'task-submit',
        result: status === 403 ? 'denied' : 'failed',
        detail: expect.stringMatching(why),
      }),
    );
    expect(await workflowExists(taskId)).toBe(false);
  });

  test('an invalid owner image is refused; a results folder another task still holds is refused', async () => {
    const alice = new RepositoryClient({ url: server.url, token: tokens.alice });
    await alice.upload('alice', 'images/junk.qcow2', Readable.from([Buffer.from('junk, not an image')]));
    for (;;) {
      const images = await alice.listImages('alice');
      if (images.find((i) => i.path === 'images/junk.qcow2')?.status !== 'inspecting') break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const id = `junk-image-${run}`;
    const r = await submit('alice', { command: 'x', image: 'images/junk.qcow2' }, id);
    expect(r).toEqual({
      status: 400,
      body: { error: expect.stringMatching(/^image: images\/junk.qcow2 is not a usable VM image/) },
    });
    expect(await workflowExists(id)).toBe(false);

    const first = `shared-1-${run}`;
    expect((await submit('alice', { command: 'x', resultsPath: `shared/${run}` }, first)).status).toBe(201);
    const second = `shared-2-${run}`;
    const clash = await submit('alice', { command: 'x', resultsPath: `shared/${run}/inner` }, second);
    expect(clash).toEqual({
      status: 409,
      body: { error: expect.stringMatching(`the results folder of task ${first}`) },
    });
    expect(await workflowExists(second)).toBe(false);
  });

  test("a disabled owner's token submits nothing", async () => {
    await setOwnerDisabled(dataDir, 'carol', true);
    try {
      const id = `disabled-${run}`;
      expect((await submit('carol', { command: 'x' }, id)).status).toBe(401);
      expect(await workflowExists(id)).toBe(false);
    } finally {
      await setOwnerDisabled(dataDir, 'carol', false);
    }
  });
});

describe('vsp task grant (operators)', () => {
  test('prints the workflow input with a capability for the task; refuses what pre-flight refuses', async () => {
    const specFile = path.join(dataDir, 'task.json');
    await fs.writeFile(specFile, JSON.stringify({ command: 'cat in/a.txt', inputs: ['in/a.txt'] }));
    const taskId = `granted-${run}`;
    const out = await runAdminCli(
      dataDir,
      'task',
      'grant',
      '--owner',
      'alice',
      '--spec',
      specFile,
      '--task-id',
      taskId,
    );
    const input = parseTaskInput(JSON.parse(out));
    expect(input.spec).toMatchObject({
      owner: 'alice',
      resultsPath: `results/${taskId}`,
      inputs: ['in/a.txt'],
    });
    expect(decodeCapabilityClaims(input.capability)).toMatchObject({
      owner: 'alice',
      taskId,
      read: ['in/a.txt'],
    });
    // The server accepts what the command minted (same key, same database).
    expect((await call('GET', fileTarget('alice', 'in/a.txt'), { token: input.capability })).status).toBe(
      200,
    );
    const granted = (await auditLines()).find((e) => e.action === 'task-grant' && e.task === taskId);
    expect(granted).toMatchObject({
      protocol: 'cli',
      owner: 'alice',
      result: 'ok',
      user: expect.stringMatching(/^admin:cli/),
    });

    await expect(
      runAdminCli(dataDir, 'task', 'grant', '--owner', 'nobody', '--spec', specFile),
    ).rejects.toThrow(/owner: no such owner: nobody/);
    await fs.writeFile(specFile, JSON.stringify({ owner: 'bob', command: 'x' }));
    await expect(
      runAdminCli(dataDir, 'task', 'grant', '--owner', 'alice', '--spec', specFile),
    ).rejects.toThrow(/spec.owner "bob"/);
    expect(await auditLines()).toContainEqual(
      audited({ protocol: 'cli', action: 'task-grant', result: 'denied' }),
    );
    await setOwnerDisabled(dataDir, 'bob', true);
    try {
      await expect(
        runAdminCli(dataDir, 'task', 'grant', '--owner', 'bob', '--spec', specFile),
      ).rejects.toThrow(/owner: bob is disabled/);
    } finally {
      await setOwnerDisabled(dataDir, 'bob', false);
    }
  });

  test('the capability key is the data dir own, mode 0600', async () => {
    const st = await fs.stat(path.join(dataDir, 'capability.key'));
    expect(st.mode & 0o777).toBe(0o600);
  });
});
