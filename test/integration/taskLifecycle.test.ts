import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { WorkflowFailedError, WorkflowNotFoundError } from '@temporalio/client';
import { resolveTemporalCli } from '../../deploy/devcluster/tools';
import { taskFailureMessage } from '../../client/vspClient';
import { TaskClientError } from '../../client/taskClient';
import { taskInput } from '../../spec/taskInput';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';
import { releaseTask, waitingCommand, waitingTaskDir } from '../support/releasedTasks';
import { temporalAddress } from '../support/temporalEnv';

const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

let fx: ClusterFixture;
let tmp: string;

beforeAll(async () => {
  fx = await startClusterFixture({ hosts: ['a', 'b'], owners: ['alice', 'bob'] });
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-e2e-'));
}, 180_000);

afterAll(async () => {
  await fx?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

async function vmFolders(): Promise<string[]> {
  const all: string[] = [];
  for (const h of ['a', 'b']) {
    const dir = path.join(fx.cluster.storeDir(h), 'vms');
    all.push(...(await fs.readdir(dir).catch(() => [] as string[])).map((v) => `${h}/${v}`));
  }
  return all;
}

async function uploadText(owner: string, repoPath: string, text: string): Promise<void> {
  const f = path.join(tmp, `up-${Math.random().toString(36).slice(2)}`);
  await fs.writeFile(f, text);
  await fx.repo(owner).upload(owner, repoPath, f);
}

function processRunning(marker: string): boolean {
  const out = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' });
  return out.split('\n').some((l) => l.includes(marker) && !l.includes('ps -eo'));
}

test('a task with two inputs runs end to end; outputs match; describe shows it completed', async () => {
  await uploadText('alice', 'in/a.txt', 'hello\n');
  await uploadText('alice', 'in/b.txt', 'world\n');
  const submitted = await fx.cluster.submitTask(
    'alice',
    {
      driver: 'process',
      name: 'concat',
      inputs: ['in/a.txt', 'in/b.txt'],
      command: 'mkdir -p out && cat in/a.txt in/b.txt > out/joined.txt && echo VSP-PROGRESS 100 done',
    },
    { taskId: `e2e-concat-${Date.now()}` },
  );
  const { taskId } = submitted;
  expect(submitted.resultsPath).toBe(`results/${taskId}`);
  const result = await fx.vsp.result(taskId);
  expect(result.exitCode).toBe(0);
  expect(result.resultsPath).toBe(submitted.resultsPath);
  expect(['a', 'b']).toContain(result.host);
  const joined = result.outputs.find((o) => o.path.endsWith('outputs/joined.txt'));
  expect(joined?.sha256).toBe(sha256('hello\nworld\n'));
  const dest = path.join(tmp, 'joined.txt');
  const info = await fx.repo('alice').download('alice', joined!.path, dest);
  expect(sha256(await fs.readFile(dest))).toBe(info.sha256);
  expect(result.logs.map((l) => l.path)).toContain(`${result.resultsPath}/logs/task.log`);

  const described = JSON.parse(
    execFileSync(
      resolveTemporalCli(),
      ['workflow', 'describe', '-w', taskId, '--address', temporalAddress(), '-o', 'json'],
      { encoding: 'utf8' },
    ),
  );
  const text = JSON.stringify(described);
  expect(text).toMatch(/WORKFLOW_EXECUTION_STATUS_COMPLETED|"status":\s*"?(Completed|COMPLETED)/);
  expect(text).toContain('VspOwner');
  expect(text).toContain('alice');
  expect(text).toContain('VspPhase');
  expect(await vmFolders()).toEqual([]);

  const listed = await until('visibility', async () => {
    const l = await fx.vsp.list({ owner: 'alice' });
    return l.find((t) => t.taskId === taskId && t.phase === 'completed');
  });
  expect(listed.host).toBe(result.host);
});

/** Expects a submission refused by the repository with `status`, naming `what`, and no workflow started. */
async function expectRefused(
  submission: (taskId: string) => Promise<unknown>,
  status: number[],
  what: RegExp,
): Promise<void> {
  const taskId = `e2e-refused-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
  const err = await submission(taskId).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(TaskClientError);
  expect(status).toContain((err as TaskClientError).status);
  expect((err as TaskClientError).reason).toMatch(what);
  await expect(fx.temporal.workflow.getHandle(taskId).describe()).rejects.toThrow(WorkflowNotFoundError);
}

test('an invalid spec is refused at submission, naming the fields; started directly it fails fast', async () => {
  await expectRefused(
    (taskId) =>
      fx.cluster.submitTask(
        'alice',
        { driver: 'process', command: '', inputs: ['../etc/passwd'] },
        { taskId },
      ),
    [400],
    /inputs/,
  );
  // The operators' path: a workflow started without the repository checks its input too.
  const handle = await fx.temporal.workflow.start('TaskLifecycle', {
    taskQueue: 'vsp',
    workflowId: `e2e-invalid-${Date.now()}`,
    args: [taskInput({ owner: 'Alice!', command: 'true', inputs: ['/etc/passwd'] }, 'vspcap_e30.forged')],
  });
  const err = await handle.result().catch((e: unknown) => e);
  expect(err).toBeInstanceOf(WorkflowFailedError);
  const cause = (err as WorkflowFailedError).cause;
  expect(cause?.message).toMatch(/owner/);
  expect(cause?.message).toMatch(/absolute/);
  expect((cause as { type?: string }).type).toBe('InvalidTaskSpec');
});

test('a missing input is refused at submission, naming the file; nothing starts on any host', async () => {
  await uploadText('alice', 'present.txt', 'x');
  await expectRefused(
    (taskId) =>
      fx.cluster.submitTask(
        'alice',
        { driver: 'process', inputs: ['present.txt', 'missing/nope.bin'], command: 'true' },
        { taskId },
      ),
    [400, 404],
    /missing\/nope\.bin/,
  );
  expect(await vmFolders()).toEqual([]);
});

test("another owner's file cannot be staged in: alice's spec naming bob's file, or naming bob", async () => {
  await uploadText('bob', 'secret.txt', 'bob only');
  await expectRefused(
    (taskId) =>
      fx.cluster.submitTask(
        'alice',
        { driver: 'process', inputs: ['secret.txt'], command: 'cat secret.txt' },
        { taskId },
      ),
    [400, 404],
    /secret\.txt/,
  );
  await expectRefused(
    (taskId) =>
      fx.cluster.submitTask(
        'alice',
        { owner: 'bob', driver: 'process', inputs: ['secret.txt'], command: 'cat secret.txt' },
        { taskId },
      ),
    [403],
    /bob/,
  );
});

test('the host worker killed mid-task and restarted: the task completes once, output intact', async () => {
  const marker = `vsp-once-${Date.now()}`;
  const { taskId } = await fx.cluster.submitTask('alice', {
    driver: 'process',
    host: 'a',
    // Runs until released after the restart: the kill always hits it mid-task.
    command: `mkdir -p out && echo run >> out/runs.txt && ${waitingCommand(marker, 'echo finished >> out/runs.txt')}`,
  });
  await until('the task to wait for its release', () => waitingTaskDir(fx.cluster.storeDir('a'), marker));
  await fx.cluster.killHost('a');
  await fx.cluster.startHost('a');
  await releaseTask(fx.cluster.storeDir('a'), marker);
  const result = await fx.vsp.result(taskId);
  const runs = result.outputs.find((o) => o.path.endsWith('outputs/runs.txt'));
  expect(runs?.sha256).toBe(sha256('run\nfinished\n'));
  expect(await vmFolders()).toEqual([]);
}, 180_000);

test("cancelling a running task through the owner's API: process gone, host folder cleaned, logs kept", async () => {
  const marker = `vspcancel${Date.now()}`;
  const alice = fx.cluster.tasks('alice');
  const { taskId } = await alice.submit({
    driver: 'process',
    command: `echo started-${marker}; sh -c 'sleep 300; echo ${marker}'`,
  });
  await until('the task to run', async () => (await alice.status(taskId)).phase === 'running' || undefined);
  await until('the command to start', async () => processRunning(`echo ${marker}`) || undefined);
  const s = await alice.cancel(taskId, 'test');
  expect(s.phase).toBe('running');
  await expect(fx.vsp.result(taskId)).rejects.toThrow();
  // As `temporal workflow cancel` ends it (the next test): CANCELED in Temporal too, not FAILED.
  expect(await alice.status(taskId)).toMatchObject({ phase: 'cancelled', status: 'CANCELLED' });
  expect((await fx.temporal.workflow.getHandle(taskId).describe()).status.name).toBe('CANCELLED');
  // Ended: a second cancel is refused, and its result is the cancellation.
  await expect(alice.cancel(taskId)).rejects.toMatchObject({ status: 409 });
  await expect(alice.result(taskId)).rejects.toMatchObject({ status: 422 });
  expect(processRunning(`echo ${marker}`)).toBe(false);
  expect(await vmFolders()).toEqual([]);
  const status = await fx.vsp.status(taskId);
  const logs = await fx.repo('alice').list('alice', `${status.resultsPath}/logs/`);
  const taskLog = logs.find((f) => f.path.endsWith('logs/task.log'));
  expect(taskLog).toBeDefined();
  const dest = path.join(tmp, 'cancel-task.log');
  await fx.repo('alice').download('alice', taskLog!.path, dest);
  expect(await fs.readFile(dest, 'utf8')).toContain(`started-${marker}`);
});

test('a task past its time limit is stopped and fails, its outputs and logs kept', async () => {
  const { taskId } = await fx.cluster.submitTask('alice', {
    driver: 'process',
    timeLimitSec: 2,
    command: 'mkdir -p out && echo partial > out/partial.txt && echo before-limit && sleep 60',
  });
  const err = await fx.vsp.result(taskId).catch((e: unknown) => e);
  expect(taskFailureMessage(err)).toMatch(/time limit of 2 s/);
  const status = await fx.vsp.status(taskId);
  expect(status.phase).toBe('failed');
  const files = (await fx.repo('alice').list('alice', `${status.resultsPath}/`)).map((f) => f.path);
  expect(files).toContain(`${status.resultsPath}/outputs/partial.txt`);
  expect(files).toContain(`${status.resultsPath}/logs/task.log`);
  expect(processRunning('before-limit')).toBe(false);
  expect(await vmFolders()).toEqual([]);
});

test("Temporal's own cancel (temporal workflow cancel) ends a running task the same way", async () => {
  const marker = `vspnative${Date.now()}`;
  const { taskId } = await fx.cluster.submitTask('alice', {
    driver: 'process',
    command: `sh -c 'sleep 300; echo ${marker}'`,
  });
  await until('the command to start', async () => processRunning(`echo ${marker}`) || undefined);
  await fx.temporal.workflow.getHandle(taskId).cancel();
  await expect(fx.vsp.result(taskId)).rejects.toThrow();
  const description = await fx.temporal.workflow.getHandle(taskId).describe();
  expect(description.status.name).toBe('CANCELLED');
  expect((await fx.vsp.status(taskId)).phase).toBe('cancelled');
  expect(processRunning(`echo ${marker}`)).toBe(false);
  expect(await vmFolders()).toEqual([]);
});
