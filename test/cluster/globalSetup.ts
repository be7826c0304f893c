import { mkdirSync } from 'node:fs';
import path from 'node:path';

import { repoRoot } from '../../deploy/devcluster/tools';
import { clusterKillSync, clusterUp } from '../../deploy/vmcluster/cluster';
import { startClusterServices, type ClusterServices } from '../../deploy/vmcluster/services';
import { CLUSTER_INVENTORY_ENV, CLUSTER_RUN_DIR_ENV, CLUSTER_VSP_DIR_ENV } from './suiteEnv';

/** What the cluster tier's teardown needs (setup and teardown run in the same jest parent process). */
export interface ClusterSuiteHandle {
  services: ClusterServices;
  /** False when the cluster was already up before the run (a developer's): teardown leaves it up. */
  ownsCluster: boolean;
}
export const CLUSTER_HANDLE_KEY = '__vspClusterSuiteHandle';

/**
 * The cluster tier's global setup (jest project `cluster`; it runs only when that project runs): brings
 * the virtual Xen cluster up once for the whole run (warm snapshots make that seconds after the first run
 * on a machine), then the services the dom0s' host workers use (deploy/vmcluster/services.ts: Temporal
 * reachable from the cluster network, the repository with a fresh service token, the control worker),
 * and leaves the inventory, with its `cluster` section, where the harness finds it: deployable as is with
 * `vsp cluster deploy --inventory`, which installs the host workers on the dom0s.
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
  const t0 = Date.now();
  const up = await clusterUp();
  const tUp = Date.now();
  keepOnSignal = up.reused;
  const ownsCluster = !up.reused;
  const runDir = path.join(
    repoRoot(),
    '.vsp',
    'test-logs',
    `${new Date().toISOString().replace(/[:.]/g, '-')}-${process.pid}-cluster`,
  );
  mkdirSync(runDir, { recursive: true });
  const services = await startClusterServices(up.inventory, runDir);
  process.env[CLUSTER_INVENTORY_ENV] = services.inventoryFile;
  process.env[CLUSTER_RUN_DIR_ENV] = runDir;
  process.env[CLUSTER_VSP_DIR_ENV] = services.vsp.opts.baseDir;
  const handle: ClusterSuiteHandle = { services, ownsCluster };
  (globalThis as Record<string, unknown>)[CLUSTER_HANDLE_KEY] = handle;
  const seconds = (from: number, to: number) => `${((to - from) / 1000).toFixed(1)} s`;
  const boots = up.boots.map((b) => `${b.name} ${b.mode} ${b.sshReadySeconds}s`).join(', ');
  const how = up.reused ? 'already up, kept' : `up in ${up.seconds}s (${boots})`;
  const c = services.inventory.cluster!;
  process.stderr.write(
    `\ncluster tier: dom0s ${how}, Temporal at ${c.temporalAddress}, repository ${c.repositoryUrl}, inventory ${services.inventoryFile}\n` +
      `cluster tier phases: dom0s ${seconds(t0, tUp)}, Temporal + repository + control worker ${seconds(tUp, Date.now())}\n`,
  );
}
