import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createHostActivities } from '../../activities/host/createHostActivities';
import type { StageOutResult, TaskRef } from '../../activities/types';
import type { HypervisorDriver, VmHandle } from '../../drivers/types';
import { addOwner, withAdmin } from '../../repository/accounts/admin';
import type { AuditEvent } from '../../repository/accounts/auditLog';
import { loadCapabilityKeys, mintCapability } from '../../repository/accounts/capabilities';
import { RepositoryClient } from '../../repository/client';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';
import { parseTaskSpec } from '../../spec/taskSpec';
import { DirectoryStaging } from '../../storage/directoryStaging';
import { VmStore } from '../../storage/vmStore';

/**
 * Stage-in and stage-out against a real repository, with the task's own capability, attempt by attempt
 * (the activity environment plays Temporal): a retry skips inputs already staged and outputs already
 * stored, and a refusal by the repository fails at once with its message.
 */
let dataDir: string;
let storeDir: string;
let server: RepositoryServer;
let owner: RepositoryClient;
const input = Buffer.from('input bytes\n'.repeat(1000));
const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-host-staging-repo-'));
  storeDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-host-staging-store-'));
  const token = (await addOwner(dataDir, 'alice')).token;
  server = await startRepositoryServer({ dataDir, port: 0 });
  owner = new RepositoryClient({ url: server.url, token });
  await owner.upload('alice', 'in/x.bin', Readable.from([input]));
  await owner.upload('alice', 'in/not-granted.txt', Readable.from([Buffer.from('private')]));
});

afterAll(async () => {
  await server?.close();
  for (const d of [dataDir, storeDir]) if (d) await fs.rm(d, { recursive: true, force: true });
});

async function taskOf(taskId: string, inputs: string[]): Promise<TaskRef> {
  const grant = {
    owner: 'alice',
    taskId,
    read: ['in/x.bin'],
    results: `results/${taskId}`,
    exp: Math.floor(Date.now() / 1000) + 3600,
  };
  const { token } = await withAdmin(dataDir, (_a, db) =>
    mintCapability(db, loadCapabilityKeys(dataDir), grant, 'test'),
  );
  return {
    taskId,
    vmId: `${taskId}-0123abcd`,
    spec: parseTaskSpec({ owner: 'alice', driver: 'process', inputs, command: 'true', outputDir: 'out' }),
    resultsPath: `results/${taskId}`,
    capability: token,
  };
}

const store = () => new VmStore(storeDir);

function activities() {
  return createHostActivities({
    hostName: 'a',
    store: store(),
    repositoryFor: (capability) => new RepositoryClient({ url: server.url, token: capability }),
    // Stage-in and stage-out only use the staging; the driver is never called.
    drivers: { process: { driver: {} as HypervisorDriver, staging: new DirectoryStaging() } },
  });
}

/** One attempt, as Temporal would run it: the workflow's ids, and what the previous attempt last reported. */
function attempt(ref: TaskRef, heartbeatDetails?: unknown) {
  const env = new MockActivityEnvironment({
    workflowExecution: { workflowId: ref.taskId, runId: 'run-1' },
    heartbeatDetails,
  });
  const beats: Record<string, unknown>[] = [];
  env.on('heartbeat', (d: Record<string, unknown>) => beats.push(d));
  return { env, beats };
}

test('a retried stage-in skips the input an earlier attempt verified and drops its partial download', async () => {
  const ref = await taskOf('staging-1', ['in/x.bin']);
  const p = store().paths(ref.vmId);
  // What a killed first attempt left: the input in place and verified, a partial download beside it.
  await fs.mkdir(path.join(p.inputsDir, 'in'), { recursive: true });
  await fs.writeFile(path.join(p.inputsDir, 'in', 'x.bin'), input);
  await fs.writeFile(path.join(p.inputsDir, 'in', '.x.bin.0123456789ab.part'), 'partial');
  const { ino } = await fs.stat(path.join(p.inputsDir, 'in', 'x.bin'));

  const { env, beats } = attempt(ref, { verified: { 'in/x.bin': sha256(input) } });
  const result = await env.run(activities().stageIn, ref);
  expect(result).toEqual({ driver: 'process', files: 1, bytes: input.length });
  // The very file the first attempt staged (a download would have renamed a new one in).
  const staged = await fs.stat(path.join(p.homeDir, 'in', 'x.bin'));
  expect(staged.ino).toBe(ino);
  expect(await fs.readdir(path.join(p.homeDir, 'in'))).toEqual(['x.bin']);
  expect(beats).toContainEqual(expect.objectContaining({ verified: { 'in/x.bin': sha256(input) } }));
  // The VM folder names its run and keeps the capability for the reaper, readable by the worker only.
  const record = path.join(p.dir, 'task.json');
  expect((await fs.stat(record)).mode & 0o077).toBe(0);
  expect(JSON.parse(await fs.readFile(record, 'utf8'))).toMatchObject({
    taskId: 'staging-1',
    runId: 'run-1',
    capability: ref.capability,
  });
});

test('a retried stage-out does not send again the outputs an earlier attempt stored', async () => {
  const ref = await taskOf('staging-2', ['in/x.bin']);
  const { env } = attempt(ref);
  await env.run(activities().stageIn, ref);
  const p = store().paths(ref.vmId);
  await fs.mkdir(path.join(p.homeDir, 'out'));
  await fs.writeFile(path.join(p.homeDir, 'out', 'r.txt'), 'result\n');
  await fs.writeFile(p.taskLog, 'the task log\n');
  const handle: VmHandle = { driver: 'process', vmId: ref.vmId, host: 'a', storageHost: 'a', state: {} };

  const first: StageOutResult = await attempt(ref).env.run(activities().stageOut, ref, handle);
  expect(first.outputs).toEqual([
    { path: 'results/staging-2/outputs/r.txt', size: 7, sha256: sha256('result\n') },
  ]);
  const second = await attempt(ref).env.run(activities().stageOut, ref, handle);
  expect(second).toEqual(first);
  // Not uploaded again: the repository saw one upload of each file, by the task's capability.
  const uploads = (await fs.readFile(path.join(dataDir, 'audit.log'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as AuditEvent)
    .filter((e) => e.action === 'upload' && e.path?.startsWith('results/staging-2/'));
  expect(uploads.map((e) => e.path).sort()).toEqual([
    'results/staging-2/logs/task.log',
    'results/staging-2/outputs/r.txt',
  ]);
  expect(uploads.every((e) => e.user?.startsWith('capability:'))).toBe(true);
});

test("an input the task's capability does not grant fails at once with the repository's refusal", async () => {
  const ref = await taskOf('staging-3', ['in/not-granted.txt']);
  const err = await attempt(ref)
    .env.run(activities().stageIn, ref)
    .catch((e: unknown) => e);
  expect(err).toMatchObject({ type: 'RepositoryRefused', nonRetryable: true });
  expect((err as Error).message).toMatch(/^(stat|download) of in\/not-granted.txt: 403 /);
});
