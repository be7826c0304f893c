import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';

import { LocalCluster } from '../devcluster/localCluster';
import { startTemporalDevServer, type TemporalDevServer } from '../devcluster/temporal';
import type { Inventory } from './cluster';
import { clusterConfig } from './config';
import { forwardTcp, type TcpForward } from './tcpForward';

/**
 * What the dom0s' host workers need on this machine, for the cluster test tier and the Xen benchmark:
 * a Temporal dev server (on loopback, forwarded from the cluster network: the dev server works only bound
 * to loopback, its internal services dial 127.0.0.1), the repository on the cluster network with a fresh
 * service token, and the control worker. The inventory written next to them has the `cluster` section, so
 * `vsp cluster deploy --inventory <file>` installs host workers that use them.
 */
export interface ClusterServices {
  inventory: Inventory;
  inventoryFile: string;
  /** The repository and the control worker (`repoDir` holds the owners). */
  vsp: LocalCluster;
  temporal: TemporalDevServer;
  stop(): Promise<void>;
}

export const TEMPORAL_PORT = 7233;
export const REPOSITORY_PORT = 8420;
/** Longer than a host worker's restart on a busy TCG dom0 (about 60 s). */
export const HOST_LIVENESS_SEC = 120;

/** Starts the services for the cluster of `vmInventory` (from clusterUp), with state and logs in `dir`. */
export async function startClusterServices(vmInventory: Inventory, dir: string): Promise<ClusterServices> {
  const { gateway } = clusterConfig();
  await fs.mkdir(dir, { recursive: true });
  let temporal: TemporalDevServer | undefined;
  let forward: TcpForward | undefined;
  let vsp: LocalCluster | undefined;
  const stop = async () => {
    await vsp?.stop();
    await forward?.close();
    await temporal?.stop();
  };
  try {
    temporal = await startTemporalDevServer({ headless: true, logFile: path.join(dir, 'temporal.log') });
    const [loopback, port] = temporal.address.split(':');
    forward = await forwardTcp(
      { host: gateway, port: TEMPORAL_PORT },
      { host: loopback, port: Number(port) },
    );
    // `vsp cluster deploy` gives this token to the host workers (repositoryTokenFile).
    const serviceToken = randomBytes(24).toString('base64url');
    const tokenFile = path.join(dir, 'repository-token');
    await fs.writeFile(tokenFile, `${serviceToken}\n`, { mode: 0o600 });
    const repositoryListen = { host: gateway, port: REPOSITORY_PORT };
    const inventory: Inventory = {
      ...vmInventory,
      cluster: {
        temporalAddress: forward.address,
        repositoryUrl: `http://${gateway}:${REPOSITORY_PORT}`,
        repositoryTokenFile: tokenFile,
        driver: 'xen',
      },
    };
    const inventoryFile = path.join(dir, 'inventory.json');
    await fs.writeFile(inventoryFile, `${JSON.stringify(inventory, null, 2)}\n`);
    vsp = await new LocalCluster({
      temporalAddress: temporal.address,
      hosts: inventory.hosts.map((h) => h.name),
      baseDir: path.join(dir, 'vsp'),
      remoteHosts: true,
      repositoryListen,
      serviceToken,
      // A host worker takes about a minute to start on a TCG dom0 (30 s is the default on real hosts): a
      // `systemctl restart` of it must not count its host down.
      controlEnv: { VSP_HOST_LIVENESS_SEC: String(HOST_LIVENESS_SEC) },
    }).start();
    return { inventory, inventoryFile, vsp, temporal, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}
