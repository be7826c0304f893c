import { promises as fs } from 'node:fs';
import path from 'node:path';
import { CONTROL_TASK_QUEUE } from '../../config/names';
import { grantTask } from '../../repository/tasks/taskAdmission';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';
import { vmFolderOf } from '../support/vmFolders';

/**
 * Bounded history with real host workers: a running task continues as new (its history limit lowered
 * through the operators' input `tuning`) and the next run waits for the same VM again: the command runs
 * once, the task completes with its output, its status and results carried across runs.
 */
let fx: ClusterFixture;

beforeAll(async () => {
  fx = await startClusterFixture({ hosts: ['a'], owners: ['alice'] });
}, 180_000);

afterAll(async () => {
  await fx?.stop();
});

test('a running task continues as new and its next run re-attaches to the same VM', async () => {
  const granted = await grantTask(fx.cluster.repoDir, {
    owner: 'alice',
    spec: {
      driver: 'process',
      // Waits for a file the test drops in its home: no timing assumption.
      command: 'mkdir -p out && echo run >> out/runs.txt && while [ ! -e go ]; do sleep 0.1; done',
    },
    taskId: `can-${Date.now()}`,
  });
  const handle = await fx.temporal.workflow.start('TaskLifecycle', {
    taskQueue: CONTROL_TASK_QUEUE,
    workflowId: granted.taskId,
    args: [{ ...granted.input, tuning: { historyEventLimit: 60 } }],
  });
  await until('the task running', async () => (await fx.vsp.status(handle.workflowId)).phase === 'running');
  // Progress reports (the old signal, still accepted) grow the history past the limit.
  for (let i = 0; (await handle.describe()).runId === handle.firstExecutionRunId; i++)
    await handle.signal('progress', { progress: i % 100 });
  const next = await until('the next run waiting for the VM', async () => {
    const s = await fx.vsp.status(handle.workflowId);
    return s.phase === 'running' ? s : undefined;
  });
  expect(next).toMatchObject({ host: 'a', resultsPath: `results/${granted.taskId}` });

  const vm = await until('the VM folder', () => vmFolderOf([fx.cluster.storeDir('a')], granted.taskId));
  await fs.writeFile(path.join(vm.storeDir, 'vms', vm.vmId, 'home', 'go'), '');
  const result = await fx.vsp.result(handle.workflowId);
  expect(result).toMatchObject({ exitCode: 0, host: 'a' });
  const runs = result.outputs.find((o) => o.path.endsWith('outputs/runs.txt'));
  const dest = path.join(path.dirname(vm.storeDir), 'runs.txt');
  await fx.repo('alice').download('alice', runs!.path, dest);
  // One run of the command: the second workflow run waited for the first one's VM, it did not start another.
  expect(await fs.readFile(dest, 'utf8')).toBe('run\n');
  expect(result.phaseMs.running).toBeGreaterThan(0);
}, 120_000);
