import { existsSync } from 'node:fs';
import { Client } from '@temporalio/client';
import { Worker } from '@temporalio/worker';
import { createControlActivities } from '../activities/control/createControlActivities';
import { CONTROL_TASK_QUEUE } from '../config/names';
import { missingSearchAttributes } from '../config/temporal';
import { connectWorkerConnection } from '../config/workerConnection';
import { syncRebalanceSchedule } from '../client/rebalanceSchedule';
import { SchedulerClient } from '../client/schedulerClient';
import { loadControlConfig, schedulerConfigOf } from '../config/workerConfig';
import { configureUpdate } from '../workflows/scheduling/definitions';
import { createLogger, describeError } from '../logging/logger';
import { WORKFLOW_BUNDLE } from './bundleWorkflows';

const log = createLogger('worker.control');

/**
 * The control worker: runs the TaskLifecycle workflows, the cluster's scheduler workflow and their
 * activities on the `vsp` queue. At start it gives the scheduler its configuration (starting it if none
 * runs): the last control worker started sets the policy and ratios, and the rebalancing Schedule.
 */
async function main(): Promise<void> {
  const config = loadControlConfig();
  const { connection, namespace, dataConverter } = await connectWorkerConnection();
  const missing = await missingSearchAttributes(connection.operatorService, namespace);
  if (missing.length > 0)
    throw new Error(
      `Temporal namespace ${namespace} lacks VSP's search attributes (every task would fail); create them: ${missing.join('; ')}`,
    );
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
      scheduler: schedulerConfigOf(config),
      localizeDisksAfterMigration: config.localizeDisksAfterMigration,
    }),
    identity: `vsp-control@${process.pid}`,
  });
  const running = worker.run();
  // The scheduler's workflow runs on this queue: the worker polls before the configuration goes to it.
  const scheduler = await new SchedulerClient(client, { config: schedulerConfigOf(config) }).update(
    configureUpdate,
    schedulerConfigOf(config),
  );
  await syncRebalanceSchedule(client, scheduler.rebalance);
  log.info({ taskQueue: CONTROL_TASK_QUEUE, hosts: config.hosts, scheduler }, 'control worker ready');
  await running;
  await connection.close();
}

main().catch((err: unknown) => {
  log.fatal({ err: describeError(err) }, 'control worker failed');
  process.exit(1);
});
