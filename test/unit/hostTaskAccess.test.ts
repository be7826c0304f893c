import { ApplicationFailure, CancelledFailure } from '@temporalio/activity';
import { classifyHostError } from '../../activities/host/failures';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Client } from '@temporalio/client';
import { readTaskRecord, saveTaskRecord, taskRepository } from '../../activities/host/taskAccess';
import { VmStore } from '../../storage/vmStore';
import { OrphanReaper } from '../../workers/orphanReaper';
import type { TaskRef } from '../../activities/types';
import { RepositoryClient, RepositoryError } from '../../repository/client';
import { parseTaskSpec } from '../../spec/taskSpec';

const b64url = (s: string) => Buffer.from(s).toString('base64url');

/** A capability of the wire form; its signature is not checked here (only the repository can). */
function capability(claims: Record<string, unknown>): string {
  const full = {
    v: 1,
    id: 'cap-0123456789',
    owner: 'alice',
    taskId: 'task-1',
    read: [],
    results: 'results/task-1',
    exp: 2_000_000_000,
    ...claims,
  };
  return `vspcap_${b64url(JSON.stringify(full))}.${b64url('signature')}`;
}

function ref(cap: string): TaskRef {
  return {
    taskId: 'task-1',
    vmId: 'task-1-abcdef12',
    spec: parseTaskSpec({ owner: 'alice', command: 'true' }),
    resultsPath: 'results/task-1',
    capability: cap,
  };
}

describe('a task capability on a host', () => {
  const tokens: string[] = [];
  const repositoryFor = (token: string) => {
    tokens.push(token);
    return new RepositoryClient({ url: 'http://127.0.0.1:9', token });
  };

  test("is presented for the task's transfers when it names this workflow and the spec's owner", () => {
    const cap = capability({});
    taskRepository(ref(cap), 'task-1', repositoryFor);
    expect(tokens).toEqual([cap]);
  });

  test.each([
    ['another task', { taskId: 'task-2' }, /minted for task 'task-2', not for task 'task-1'/],
    ['another owner', { owner: 'bob' }, /minted for owner 'bob'.*belongs to 'alice'/],
  ])('minted for %s is refused as CapabilityMismatch, non-retryable', (_what, claims, message) => {
    tokens.length = 0;
    let err: unknown;
    try {
      taskRepository(ref(capability(claims)), 'task-1', repositoryFor);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ApplicationFailure);
    expect(err).toMatchObject({ type: 'CapabilityMismatch', nonRetryable: true });
    expect((err as Error).message).toMatch(message);
    expect(tokens).toEqual([]);
  });

  test('that is malformed is refused, naming what is wrong', () => {
    expect(() => taskRepository(ref('vspcap_x'), 'task-1', repositoryFor)).toThrow(
      /capability is malformed: a capability is two base64url parts/,
    );
  });
});

describe('host errors', () => {
  const classify = (err: unknown) => classifyHostError(err, 'a') as ApplicationFailure;

  test('a full store fails at once as StoreFull, with the first cause in the message', () => {
    const enospc = Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
    const wrapped = new RepositoryError(0, 'download of in.bin to /s/in.bin failed', { cause: enospc });
    for (const err of [
      wrapped,
      new Error('mke2fs -q ...: mke2fs: No space left on device while writing out and closing file system'),
    ]) {
      const f = classify(err);
      expect(f).toMatchObject({ type: 'StoreFull', nonRetryable: true });
      expect(f.message).toMatch(/^No space left on device: the VM store of host a is full/);
      expect(f.cause).toBe(err);
    }
  });

  test.each([401, 403, 404, 409])(
    'a %i from the repository is RepositoryRefused with its message',
    (status) => {
      const err = new RepositoryError(status, `download of in.bin: ${status} no access to in.bin`);
      expect(classify(err)).toMatchObject({
        type: 'RepositoryRefused',
        nonRetryable: true,
        message: `download of in.bin: ${status} no access to in.bin`,
      });
    },
  );

  test.each([0, 500, 503, 429])(
    'status %i (unreachable, 5xx, busy) is RepositoryUnavailable, retried',
    (status) => {
      const f = classify(new RepositoryError(status, `GET http://x failed`));
      expect(f).toMatchObject({ type: 'RepositoryUnavailable', nonRetryable: false });
    },
  );

  test('Temporal failures and other errors pass unchanged', () => {
    const cancelled = new CancelledFailure('cancelled');
    const app = ApplicationFailure.nonRetryable('x', 'VmLost');
    const other = new Error('something else');
    expect(classifyHostError(cancelled, 'a')).toBe(cancelled);
    expect(classifyHostError(app, 'a')).toBe(app);
    expect(classifyHostError(other, 'a')).toBe(other);
  });
});

describe("a VM folder's task record", () => {
  let root: string;
  beforeEach(async () => {
    root = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-record-'));
  });
  afterEach(() => fs.rm(root, { recursive: true, force: true }));

  test('is written whole, readable by the worker only, and read back', async () => {
    const store = new VmStore(root);
    const record = {
      v: 1 as const,
      taskId: 't1',
      runId: 'r1',
      owner: 'alice',
      resultsPath: 'results/t1',
      outputDir: 'out',
      capability: 'secret',
    };
    await saveTaskRecord(store, 'vm1', record);
    expect(await readTaskRecord(store, 'vm1')).toEqual(record);
    expect((await fs.stat(path.join(root, 'vms', 'vm1', 'task.json'))).mode & 0o777).toBe(0o600);
    expect(await fs.readdir(path.join(root, 'vms', 'vm1'))).toEqual(['task.json']);
  });

  test('cut to nothing (a crash before records were durable) leaves its folder to the operator, named', async () => {
    const store = new VmStore(root);
    await fs.mkdir(store.paths('cut').dir, { recursive: true });
    await fs.writeFile(path.join(store.paths('cut').dir, 'task.json'), '');
    const reaper = new OrphanReaper({
      hostName: 'a',
      identity: 'vsp-host-a@1',
      store,
      // Never asked: nothing names a run to ask about.
      client: {} as Client,
      drivers: {},
      repositoryFor: () => {
        throw new Error('no upload for an unidentified folder');
      },
    });
    const report = await reaper.sweep({ startup: false });
    expect(report).toMatchObject({ kept: [], reaped: [], unidentified: ['cut'] });
    expect(await fs.readdir(store.paths('cut').dir)).toEqual(['task.json']);
  });
});
