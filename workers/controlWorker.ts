import { existsSync } from 'node:fs';
import { Client } from '@temporalio/client';
import { Worker } from '@temporalio/worker';
import { createControlActivities } from '../activities/control/createControlActivities';
import { CONTROL_TASK_QUEUE } from '../config/names';
import { connectWorkerConnection } from '../config/temporal';
import { loadControlConfig } from '../config/workerConfig';
import { createLogger, describeError } from '../logging/logger';
import { WORKFLOW_BUNDLE } from './bundleWorkflows';

const log = createLogger('worker.control');

/** The control worker: runs the TaskLifecycle workflows and placement on the `vsp` queue. */
async function main(): Promise<void> {
  const config = loadControlConfig();
  const { connection, namespace, dataConverter } = await connectWorkerConnection();
  const client = new Client({ connection, namespace, dataConverter });
  const worker = await Worker.create({
    connection,
    namespace,
    dataConverter,
    taskQueue: CONTROL_TASK_QUEUE,
    ...(existsSync(WORKFLOW_BUNDLE)
      ? { workflowBundle: { codePath: WORKFLOW_BUNDLE } }
      : { workflowsPath: require.resolve('../workflows') }),
    activities: createControlActivities({
      client,
      hosts: config.hosts,
      hostLivenessSec: config.hostLivenessSec,
    }),
    identity: `vsp-control@${process.pid}`,
  });
  log.info({ taskQueue: CONTROL_TASK_QUEUE, hosts: config.hosts }, 'control worker ready');
  await worker.run();
  await connection.close();
}

main().catch((err: unknown) => {
  log.fatal({ err: describeError(err) }, 'control worker failed');
  process.exit(1);
});
