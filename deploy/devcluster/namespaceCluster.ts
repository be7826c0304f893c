import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Client, Connection } from '@temporalio/client';
import { VspClient } from '../../client/vspClient';
import { ensureAppliance } from '../../drivers/qemu/appliance';
import { RepositoryClient } from '../../repository/client';
import { LocalCluster } from './localCluster';
import { createTestNetwork, requireRoot, type TestNetwork } from './netns';
import { startTemporalDevServer } from './temporal';

/**
 * A dev cluster on namespace test hosts, for the workflow-level migration tests and benchmarks
 * (test/support/namespaceCluster.ts adds the test run's log folder): each host worker runs in
 * its namespace next to an nfs-ganesha export of its store, with the VM network on the hosts' bridges;
 * real QEMU under TCG; a Temporal dev server and the repository reached at the namespaces' gateway.
 * Needs root.
 */
export interface NamespaceCluster {
  network: TestNetwork;
  cluster: LocalCluster;
  client: Client;
  vsp: VspClient;
  /** Where the namespaces' Temporal is reached (TEMPORAL_ADDRESS for the CLI). */
  temporalAddress: string;
  baseDir: string;
  repo(owner: string): RepositoryClient;
  /** The VM folder of `vmId` in `host`'s store. */
  vmDir(host: string, vmId: string): string;
  stop(): Promise<void>;
}

/** A Temporal server the cluster uses, and how to stop it. */
export interface StartedTemporal {
  address: string;
  namespace: string;
  stop(): Promise<void>;
}

export async function startNamespaceCluster(opts: {
  hosts: string[];
  /** Namespace and link prefix, and the segment's /24: distinct per test file. */
  prefix: string;
  subnet: string;
  owners: string[];
  /** Extra environment for the host workers and the control worker. */
  hostEnv?: NodeJS.ProcessEnv;
  controlEnv?: NodeJS.ProcessEnv;
  /** Where the cluster's Temporal dev server writes its log. */
  logDir: string;
  /**
   * Another Temporal server instead of a dev server, started once the network exists, bound to `ip` (the
   * namespaces' gateway): e.g. deploy/temporal/'s on PostgreSQL.
   */
  startTemporal?: (ip: string) => Promise<StartedTemporal>;
}): Promise<NamespaceCluster> {
  requireRoot('the migration tests (network namespaces, NFS exports)');
  await ensureAppliance();
  const baseDir = await fs.mkdtemp(path.join(os.tmpdir(), `${opts.prefix}e2e-`));
  let network: TestNetwork | undefined;
  let temporal: StartedTemporal | undefined;
  let cluster: LocalCluster | undefined;
  let connection: Connection | undefined;
  const stop = async () => {
    await connection?.close();
    await cluster?.stop();
    await temporal?.stop();
    // Kills whatever a failed test left in the namespaces (QEMU), then removes them.
    await network?.teardown();
    if (process.env.VSP_KEEP_TEST_DIRS === '1') process.stderr.write(`kept ${baseDir}\n`);
    else await fs.rm(baseDir, { recursive: true, force: true });
  };
  try {
    network = await createTestNetwork({ hosts: opts.hosts, prefix: opts.prefix, subnet: opts.subnet });
    // The suite's Temporal listens on loopback, which the namespaces cannot reach: the cluster's own is
    // reached at the gateway (a dev server listens on every address: its services dial each other on
    // loopback).
    const gateway = network.gateway;
    const started = opts.startTemporal
      ? await opts.startTemporal(gateway)
      : await startTemporalDevServer({
          ip: '0.0.0.0',
          headless: true,
          logFile: path.join(opts.logDir, `${opts.prefix}temporal.log`),
        }).then((dev) => ({ ...dev, address: `${gateway}:${dev.address.split(':').pop()}` }));
    temporal = started;
    const temporalAddress = started.address;
    cluster = await new LocalCluster({
      temporalAddress,
      temporalNamespace: started.namespace,
      hosts: opts.hosts,
      baseDir,
      drivers: ['qemu', 'process'],
      hostEnv: { VSP_ACCEL: 'tcg', ...opts.hostEnv },
      controlEnv: opts.controlEnv,
      owners: opts.owners,
      testHosts: { network },
    }).start();
    connection = await Connection.connect({ address: temporalAddress });
    const client = new Client({ connection, namespace: started.namespace });
    const c = cluster;
    return {
      network,
      cluster,
      client,
      vsp: new VspClient(client),
      temporalAddress,
      baseDir,
      repo: (owner) => new RepositoryClient({ url: c.repositoryUrl, token: c.ownerTokens.get(owner) ?? '' }),
      vmDir: (host, vmId) => path.join(c.storeDir(host), 'vms', vmId),
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}
