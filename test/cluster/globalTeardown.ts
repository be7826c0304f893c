import { clusterDown } from '../../deploy/vmcluster/cluster';
import { CLUSTER_HANDLE_KEY, type ClusterSuiteHandle } from './globalSetup';

/** Stops the repository, the control worker and Temporal, and removes the cluster the setup brought up. */
export default async function clusterGlobalTeardown(): Promise<void> {
  const handle = (globalThis as Record<string, unknown>)[CLUSTER_HANDLE_KEY] as
    ClusterSuiteHandle | undefined;
  if (!handle) return;
  try {
    await handle.services.stop();
  } finally {
    if (handle.ownsCluster) await clusterDown();
  }
}
