import { Client } from '@temporalio/client';
import { Worker } from '@temporalio/worker';
import { createHostActivities } from '../activities/host/createHostActivities';
import { createMigrationActivities } from '../activities/host/migrationActivities';
import { connectWorkerConnection } from '../config/temporal';
import { hostTaskQueue } from '../config/names';
import { loadHostConfig } from '../config/workerConfig';
import { progressSignal } from '../workflows/definitions';
import { createLogger, describeError } from '../logging/logger';
import { RepositoryClient } from '../repository/client';
import { checkClusterExports } from '../storage/nfsExport';
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
  const migration = createMigrationActivities({
    hostName: config.host,
    drivers,
    migration: {
      downtimeLimitMs: config.migrationDowntimeMs,
      maxBandwidthBytesPerSec: config.migrationMaxBandwidth,
      timeoutMs: config.migrationTimeoutSec === undefined ? undefined : config.migrationTimeoutSec * 1000,
    },
  });
  // Other hosts may come up later: an unreachable export is reported, not fatal (migrations check again).
  if (Object.keys(config.clusterStorage).length > 1)
    checkClusterExports(config.host, config.clusterStorage, config.netns).then(
      () =>
        log.info({ hosts: Object.keys(config.clusterStorage) }, 'every NFS export of the cluster answers'),
      (err: unknown) =>
        log.warn({ err: describeError(err) }, 'some NFS exports of the cluster do not answer'),
    );
  const worker = await Worker.create({
    connection,
    namespace,
    taskQueue: hostTaskQueue(config.host),
    activities: { ...activities, ...migration },
    identity: `vsp-host-${config.host}@${process.pid}`,
  });
  log.info(
    {
      host: config.host,
      taskQueue: hostTaskQueue(config.host),
      drivers: Object.keys(drivers),
      store: config.storeDir,
      exports: Object.keys(config.clusterStorage),
      netns: config.netns,
      vmNetwork: config.vmNetwork,
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
