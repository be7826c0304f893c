import {
  startNamespaceCluster as startInLogDir,
  type NamespaceCluster,
} from '../../deploy/devcluster/namespaceCluster';
import { testLogDir } from './testRun';

export type { NamespaceCluster };

/** A namespace dev cluster (deploy/devcluster/namespaceCluster.ts) logging into the test run's folder. */
export function startNamespaceCluster(
  opts: Omit<Parameters<typeof startInLogDir>[0], 'logDir'>,
): Promise<NamespaceCluster> {
  return startInLogDir({ ...opts, logDir: testLogDir() });
}
