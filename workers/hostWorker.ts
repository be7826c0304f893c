import { Client } from '@temporalio/client';
import { Worker } from '@temporalio/worker';
import { createHostActivities } from '../activities/host/createHostActivities';
import { connectWorkerConnection } from '../config/temporal';
import { hostTaskQueue } from '../config/names';
import { loadHostConfig } from '../config/workerConfig';
import { progressSignal } from '../workflows/definitions';
import { createLogger, describeError } from '../logging/logger';
import { RepositoryClient } from '../repository/client';
import { VmStore } from '../storage/vmStore';
import { createDriverBindings } from './driverBindings';

const log = createLogger('worker.host');

/**
 * A host worker: polls its own task queue (vsp-host-<name>) and runs every activity that touches this
 * host's disk or VMs. VMs outlive it: on start it re-attaches to what its predecessor left running.
 */
async function main(): Promise<void> {
  const config = loadHostConfig();
  const store = new VmStore(config.storeDir);
  await store.init();
  const repository = new RepositoryClient({ url: config.repositoryUrl, token: config.repositoryToken });
  const drivers = await createDriverBindings(config, store, repository);
  const { connection, namespace } = await connectWorkerConnection();
  const client = new Client({ connection, namespace });

  for (const vmId of await store.list()) {
    const state = await store.readState<{ handle?: { driver: string } }>(vmId).catch(() => undefined);
    log.info({ vmId, state: state ? 'present' : 'none' }, 'VM found in the store; its task will re-attach');
  }

  const activities = createHostActivities({
    hostName: config.host,
    store,
    repository,
    drivers,
    defaultDriver: config.defaultDriver,
    reportProgress: async (workflowId, progress, message) => {
      await client.workflow.getHandle(workflowId).signal(progressSignal, { progress, message });
    },
  });
  const worker = await Worker.create({
    connection,
    namespace,
    taskQueue: hostTaskQueue(config.host),
    activities,
    identity: `vsp-host-${config.host}@${process.pid}`,
  });
  log.info(
    {
      host: config.host,
      taskQueue: hostTaskQueue(config.host),
      drivers: Object.keys(drivers),
      store: config.storeDir,
    },
    'host worker ready',
  );
  await worker.run();
  await connection.close();
}

main().catch((err: unknown) => {
  log.fatal({ err: describeError(err) }, 'host worker failed');
  process.exit(1);
});
