import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ProcessDriver } from '../../drivers/process/processDriver';
import { TaskAccounts } from '../../drivers/process/taskAccounts';
import { isSameProcessAlive, processStartTime } from '../../drivers/processLiveness';
import { VmStore } from '../../storage/vmStore';
import { waitingCommand } from '../support/releasedTasks';

/**
 * A host worker killed after the task's wrapper started but before it recorded the wrapper's pid in the
 * VM's state (the window is the wrapper's first milliseconds): the worker that finds the VM later must
 * still see the task running and be able to stop it, or the orphan reaper removes the folder and leaves
 * the task running for good. Root: the driver runs each task under an account of its own.
 */
let tmp: string;
let driver: ProcessDriver;
let store: VmStore;
/** The task's wrapper, leader of its process group: killed at the end whatever the test's outcome. */
let wrapper: number | undefined;

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-procdriver-'));
  store = new VmStore(path.join(tmp, 'store'));
  const accounts = new TaskAccounts(undefined, path.join(tmp, 'uids'));
  driver = new ProcessDriver({ store, hostName: 'a', accounts, pollMs: 50 });
});

afterAll(async () => {
  try {
    if (wrapper) process.kill(-wrapper, 'SIGKILL');
  } catch {
    // already gone: the test stopped it
  }
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

test('a task whose pid never reached the state is still seen running, and stopped', async () => {
  const vmId = 'vm-unrecorded';
  const created = await driver.create({
    vmId,
    owner: 'alice',
    command: waitingCommand('never-released'),
    vcpus: 1,
    memoryMiB: 256,
    ports: [],
    timeLimitSec: 600,
  });
  const started = await driver.start(created);
  const pid = Number(started.state.pid);
  wrapper = pid;
  // What a worker killed inside start() leaves: the wrapper runs, the state names no pid.
  const {
    pid: _pid,
    pidStartTime: _t,
    ...unrecorded
  } = (await store.readState<Record<string, unknown>>(vmId))!;
  await store.writeState(vmId, unrecorded);

  expect(await driver.inspect(created)).toMatchObject({ phase: 'running', details: { pid } });
  const startTime = (await processStartTime(pid))!;
  await driver.stop(created, 5_000);
  expect(await isSameProcessAlive(pid, startTime)).toBe(false);
  expect((await driver.inspect(created)).phase).toMatch(/exited|missing/);
  await driver.destroy(created);
});
