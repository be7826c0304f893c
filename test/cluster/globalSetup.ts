import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';

import { startTemporalDevServer, type TemporalDevServer } from '../../deploy/devcluster/temporal';
import { repoRoot } from '../../deploy/devcluster/tools';
import { clusterKillSync, clusterUp, type Inventory } from '../../deploy/vmcluster/cluster';
import { CLUSTER_INVENTORY_ENV, GATEWAY } from './suiteEnv';
import { forwardTcp, type TcpForward } from './tcpForward';

/** What the cluster tier's teardown needs (setup and teardown run in the same jest parent process). */
export interface ClusterSuiteHandle {
  temporal: TemporalDevServer;
  temporalForward: TcpForward;
  /** False when the cluster was already up before the run (a developer's): teardown leaves it up. */
  ownsCluster: boolean;
}
export const CLUSTER_HANDLE_KEY = '__vspClusterSuiteHandle';

const TEMPORAL_PORT = 7233;
const REPOSITORY_PORT = 8420;

/**
 * The cluster tier's global setup (jest project `cluster`; it runs only when that project runs): brings
 * the virtual Xen cluster up once for the whole run (warm snapshots make that seconds after the first run
 * on a machine), starts a Temporal dev server for the dom0s' workers (on loopback, forwarded from the
 * cluster network), makes the repository's service token, and leaves the inventory, with its `cluster`
 * section, where the harness finds it: deployable as is with `vsp cluster deploy --inventory`.
 */
export default async function clusterGlobalSetup(): Promise<void> {
  if (process.getuid?.() !== 0) {
    process.stderr.write('\ncluster tier: not root, so no cluster (its tests skip)\n');
    return;
  }
  // Ctrl-C or a CI timeout skips teardown: the dom0s this run started must not outlive it.
  let keepOnSignal = false;
  for (const signal of ['SIGINT', 'SIGTERM'] as const)
    process.once(signal, () => {
      if (!keepOnSignal) clusterKillSync();
    });
  const up = await clusterUp();
  keepOnSignal = up.reused;
  const ownsCluster = !up.reused;
  const runDir = path.join(
    repoRoot(),
    '.vsp',
    'test-logs',
    `${new Date().toISOString().replace(/[:.]/g, '-')}-${process.pid}-cluster`,
  );
  mkdirSync(runDir, { recursive: true });
  const temporal = await startTemporalDevServer({
    headless: true,
    logFile: path.join(runDir, 'temporal.log'),
  });
  const [loopback, port] = temporal.address.split(':');
  const temporalForward = await forwardTcp(
    { host: GATEWAY, port: TEMPORAL_PORT },
    { host: loopback, port: Number(port) },
  );
  // The repository the tests serve uses this service token; `vsp cluster deploy` gives it to the workers.
  const tokenFile = path.join(runDir, 'repository-token');
  writeFileSync(tokenFile, `${randomBytes(24).toString('base64url')}\n`, { mode: 0o600 });
  const inventory: Inventory = {
    ...up.inventory,
    cluster: {
      temporalAddress: temporalForward.address,
      repositoryUrl: `http://${GATEWAY}:${REPOSITORY_PORT}`,
      repositoryTokenFile: tokenFile,
      driver: 'xen',
    },
  };
  const file = path.join(runDir, 'inventory.json');
  writeFileSync(file, `${JSON.stringify(inventory, null, 2)}\n`);
  process.env[CLUSTER_INVENTORY_ENV] = file;
  const handle: ClusterSuiteHandle = { temporal, temporalForward, ownsCluster };
  (globalThis as Record<string, unknown>)[CLUSTER_HANDLE_KEY] = handle;
  const boots = up.boots.map((b) => `${b.name} ${b.mode} ${b.sshReadySeconds}s`).join(', ');
  const how = up.reused ? 'already up, kept' : `up in ${up.seconds}s (${boots})`;
  process.stderr.write(
    `\ncluster tier: dom0s ${how}, Temporal at ${temporalForward.address}, inventory ${file}\n`,
  );
}
