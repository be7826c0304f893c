import { clusterDown } from '../../deploy/vmcluster/cluster';
import { CLUSTER_HANDLE_KEY, type ClusterSuiteHandle } from './globalSetup';

/** Stops the tier's Temporal server and removes the cluster it brought up (QEMUs, netns, taps, veth). */
export default async function clusterGlobalTeardown(): Promise<void> {
  const handle = (globalThis as Record<string, unknown>)[CLUSTER_HANDLE_KEY] as
    ClusterSuiteHandle | undefined;
  if (!handle) return;
  try {
    await handle.temporalForward.close();
    await handle.temporal.stop();
  } finally {
    if (handle.ownsCluster) await clusterDown();
  }
}
