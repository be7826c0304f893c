import os from 'node:os';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createHostActivities } from '../../activities/host/createHostActivities';
import type { HostDeps } from '../../activities/host/hostDeps';
import type { HypervisorDriver, VmHandle, VmStatus, WaitOptions } from '../../drivers/types';
import { RepositoryClient } from '../../repository/client';
import { DirectoryStaging } from '../../storage/directoryStaging';
import { VmStore } from '../../storage/vmStore';

const handle: VmHandle = { driver: 'fake', vmId: 'vm-1', host: 'a', storageHost: 'a', state: {} };

/** A driver whose `wait` fails as scripted (a QMP timeout...) and whose `inspect` says what the VM does. */
function fakeDriver(script: { waitErrors: number; phaseAfterError: VmStatus['phase'] }): HypervisorDriver {
  let waits = 0;
  return {
    name: 'fake',
    capabilities: { liveMigration: false, isolation: 'vm', homeStaging: 'directory' },
    recover: async () => ({ phase: 'running', details: {} }),
    inspect: async () => ({ phase: script.phaseAfterError, details: {} }),
    wait: async (_h: VmHandle, opts: WaitOptions) => {
      opts.onProgress({ phase: 'running', progress: 40 + waits, progressMessage: 'encoding', details: {} });
      if (waits++ < script.waitErrors) throw new Error('QMP query-status: no reply within 5000 ms');
      return { exitCode: 0, timedOut: false };
    },
  } as unknown as HypervisorDriver;
}

function activitiesWith(driver: HypervisorDriver, reportProgress?: HostDeps['reportProgress']) {
  const repository = new RepositoryClient({ url: 'http://127.0.0.1:9', token: 'unused' });
  const deps: HostDeps = {
    hostName: 'a',
    store: new VmStore(os.tmpdir()),
    repositoryFor: () => repository,
    drivers: { fake: { driver, staging: new DirectoryStaging() } },
    reportProgress,
  };
  return createHostActivities(deps);
}

test('awaitVm rides out a transient driver error while the VM runs; progress goes out as heartbeat details', async () => {
  const env = new MockActivityEnvironment();
  const beats: unknown[] = [];
  env.on('heartbeat', (d: unknown) => beats.push(d));
  const { awaitVm } = activitiesWith(fakeDriver({ waitErrors: 2, phaseAfterError: 'running' }));
  const result = await env.run(awaitVm, handle);
  expect(result).toEqual({ exitCode: 0, timedOut: false, progress: 42, progressMessage: 'encoding' });
  // Exactly the three fields the status query merges.
  expect(beats).toContainEqual({ phase: 'running', progress: expect.any(Number), message: 'encoding' });
});

test('awaitVm returns the report the driver read after the end, which no poll saw', async () => {
  const driver = {
    ...fakeDriver({ waitErrors: 0, phaseAfterError: 'running' }),
    wait: async (_h: VmHandle, opts: WaitOptions) => {
      opts.onProgress({ phase: 'running', progress: 96, progressMessage: 'pass 8', details: {} });
      return { exitCode: 0, timedOut: false, progress: 100, progressMessage: 'done' };
    },
  };
  const result = await new MockActivityEnvironment().run(activitiesWith(driver).awaitVm, handle);
  expect(result).toMatchObject({ progress: 100, progressMessage: 'done' });
});

test('awaitVm tells the workflow its progress at each 10 % step, not at every report', async () => {
  const driver = {
    ...fakeDriver({ waitErrors: 0, phaseAfterError: 'running' }),
    wait: async (_h: VmHandle, opts: WaitOptions) => {
      for (const progress of [5, 8, 12, 40, 41, 49, 50])
        opts.onProgress({ phase: 'running', progress, progressMessage: `at ${progress}`, details: {} });
      return { exitCode: 0, timedOut: false, progress: 100 };
    },
  };
  const sent: unknown[] = [];
  const env = new MockActivityEnvironment();
  const taskId = env.context.info.workflowExecution?.workflowId;
  await env.run(
    activitiesWith(driver, async (id, report) => void sent.push({ id, ...report })).awaitVm,
    handle,
  );
  // The end (100) reaches the workflow in awaitVm's result.
  expect(sent).toEqual([5, 12, 40, 50].map((p) => ({ id: taskId, progress: p, message: `at ${p}` })));
});

test('awaitVm fails as VmFailed, with the driver error, once the VM is gone', async () => {
  const env = new MockActivityEnvironment();
  const { awaitVm } = activitiesWith(fakeDriver({ waitErrors: 1, phaseAfterError: 'missing' }));
  await expect(env.run(awaitVm, handle)).rejects.toMatchObject({
    type: 'VmFailed',
    nonRetryable: true,
    message: expect.stringContaining('QMP query-status: no reply'),
  });
});
