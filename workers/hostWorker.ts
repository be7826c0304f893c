import { randomBytes } from 'node:crypto';
import { Client } from '@temporalio/client';
import { Worker } from '@temporalio/worker';
import { createHostActivities } from '../activities/host/createHostActivities';
import { createInventory } from '../activities/host/hostInventory';
import { cpuListSize } from '../drivers/xen/domainConfig';
import { createHostLivenessActivities } from '../activities/host/hostLiveness';
import { createMigrationActivities } from '../activities/host/migrationActivities';
import { connectWorkerConnection } from '../config/workerConnection';
import { CONTROL_TASK_QUEUE, hostLivenessWorkflowId, hostTaskQueue } from '../config/names';
import { loadHostConfig, type HostConfig } from '../config/workerConfig';
import { createLogger, describeError } from '../logging/logger';
import { RepositoryClient } from '../repository/client';
import { checkClusterExports } from '../storage/nfsExport';
import { ImageNames } from '../storage/imageNames';
import { VmStore } from '../storage/vmStore';
import { progressSignal } from '../workflows/definitions';
import type { HostLivenessInput } from '../workflows/hostLiveness';
import { acceleratorOf, createDriverBindings } from './driverBindings';
import { OrphanReaper } from './orphanReaper';
import { tuneHeapForStreaming } from '../lib/streamingHeap';

const log = createLogger('worker.host');

/**
 * A host worker: polls its own task queue (vsp-host-<name>) and runs every activity that touches this
 * host's disk or VMs. VMs outlive it: on start it re-attaches to what its predecessor left running, and
 * its orphan reaper removes what no open workflow run owns any more. Its liveness heartbeat tells the
 * control worker it is up, and what it offers (its inventory, for the scheduler).
 */
async function main(): Promise<void> {
  tuneHeapForStreaming();
  const config = loadHostConfig();
  const store = new VmStore(config.storeDir);
  await store.init();
  const repository = new RepositoryClient({ url: config.repositoryUrl, token: config.repositoryToken });
  const repositoryFor = (capability: string) =>
    new RepositoryClient({ url: config.repositoryUrl, token: capability });
  const drivers = await createDriverBindings(config, store, repository);
  const { connection, namespace, dataConverter } = await connectWorkerConnection();
  const client = new Client({ connection, namespace, dataConverter });

  const activities = createHostActivities({
    hostName: config.host,
    store,
    repositoryFor,
    drivers,
    defaultDriver: config.defaultDriver,
    reportProgress: (taskId, report) => client.workflow.getHandle(taskId).signal(progressSignal, report),
  });
  const migration = createMigrationActivities({
    hostName: config.host,
    store,
    drivers,
    migration: {
      downtimeLimitMs: config.migrationDowntimeMs,
      maxBandwidthBytesPerSec: config.migrationMaxBandwidth,
      timeoutMs: config.migrationTimeoutSec === undefined ? undefined : config.migrationTimeoutSec * 1000,
    },
  });
  const liveness = createHostLivenessActivities({
    hostName: config.host,
    heartbeatMs: config.heartbeatSec * 1000,
    inventory: createInventory({
      host: config.host,
      storeDir: config.storeDir,
      drivers: Object.keys(drivers),
      defaultDriver: config.defaultDriver,
      accelerator: await acceleratorOf(config),
      // dom0 sees only its own vCPUs: a Xen host that keeps guests to a CPU list offers that many.
      vcpus: config.vcpus ?? (config.xenGuestCpus ? cpuListSize(config.xenGuestCpus) : undefined),
      memoryMiB: config.memoryMiB,
      labels: config.labels,
      images: new ImageNames(store.imagesDir),
    }),
  });
  // Other hosts may come up later: an unreachable export is reported, not fatal (migrations check again).
  if (Object.keys(config.clusterStorage).length > 1)
    checkClusterExports(config.host, config.clusterStorage, {
      libnfs: 'qemu' in drivers && config.qemuRemoteDisks === 'nfs',
      mountRoot: 'xen' in drivers || config.qemuRemoteDisks === 'mounts' ? config.mountRoot : undefined,
      netns: config.netns,
    }).then(
      () =>
        log.info({ hosts: Object.keys(config.clusterStorage) }, 'every NFS export of the cluster answers'),
      (err: unknown) =>
        log.warn({ err: describeError(err) }, 'some NFS exports of the cluster do not answer'),
    );
  // Unique per start even when a container gives every start the same pid: the orphan reaper tells its
  // predecessor's attempts from its own by it.
  const identity = `vsp-host-${config.host}@${process.pid}.${randomBytes(4).toString('hex')}`;
  const worker = await Worker.create({
    connection,
    namespace,
    dataConverter,
    taskQueue: hostTaskQueue(config.host),
    activities: { ...activities, ...migration, ...liveness },
    identity,
    // Heartbeats (liveness, task progress) reach Temporal within one period, whatever the timeouts.
    maxHeartbeatThrottleInterval: config.heartbeatSec * 1000,
  });
  await startLiveness(client, config);

  const reaper = new OrphanReaper({ hostName: config.host, identity, store, client, drivers, repositoryFor });
  await reaper.removeStaleTempFiles(true);
  // VMs are swept while the worker already serves: open runs re-attach meanwhile, nothing waits.
  let sweeping: Promise<unknown> = Promise.resolve();
  const sweep = (startup: boolean) => {
    sweeping = sweeping
      .then(() => reaper.sweep({ startup }))
      .catch((err: unknown) => log.error({ err: describeError(err) }, 'orphan sweep failed'));
  };
  sweep(true);
  const timer = setInterval(() => sweep(false), config.reaperIntervalSec * 1000);
  await reaper
    .releaseStaleAttempts(hostLivenessWorkflowId(config.host))
    .catch((err: unknown) =>
      log.warn({ err: describeError(err) }, "could not release the predecessor's liveness heartbeat"),
    );

  log.info(
    {
      host: config.host,
      taskQueue: hostTaskQueue(config.host),
      drivers: Object.keys(drivers),
      store: config.storeDir,
      exports: Object.keys(config.clusterStorage),
      netns: config.netns,
      vmNetwork: config.vmNetwork,
      heartbeatSec: config.heartbeatSec,
    },
    'host worker ready',
  );
  try {
    await worker.run();
  } finally {
    clearInterval(timer);
    await sweeping;
    await connection.close();
  }
}

/** Starts this host's liveness workflow unless it runs already (a restarted worker finds it). */
async function startLiveness(client: Client, config: HostConfig): Promise<void> {
  const input: HostLivenessInput = { host: config.host, heartbeatSec: config.heartbeatSec };
  await client.workflow.start('HostLiveness', {
    taskQueue: CONTROL_TASK_QUEUE,
    workflowId: hostLivenessWorkflowId(config.host),
    args: [input],
    workflowIdConflictPolicy: 'USE_EXISTING',
  });
}

main().catch((err: unknown) => {
  log.fatal({ err: describeError(err) }, 'host worker failed');
  process.exit(1);
});
