import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Client, Connection } from '@temporalio/client';
import { LocalCluster, type LocalClusterOptions } from '../../deploy/devcluster/localCluster';
import { RepositoryClient } from '../../repository/client';
import { VspClient } from '../../client/vspClient';
import { temporalAddress } from './temporalEnv';

export interface ClusterFixture {
  cluster: LocalCluster;
  temporal: Client;
  vsp: VspClient;
  repo(owner: string): RepositoryClient;
  stop(): Promise<void>;
}

/**
 * A local cluster in a fresh temp folder removed on stop, on the suite's Temporal dev server unless
 * `temporalAddress` (and `temporalNamespace`) name another.
 */
export async function startClusterFixture(
  opts: Omit<LocalClusterOptions, 'temporalAddress' | 'baseDir'> & { temporalAddress?: string },
): Promise<ClusterFixture> {
  const baseDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-test-'));
  const address = opts.temporalAddress ?? temporalAddress();
  const cluster = new LocalCluster({ ...opts, temporalAddress: address, baseDir });
  await cluster.start();
  const connection = await Connection.connect({ address });
  const temporal = new Client({ connection, namespace: cluster.temporalNamespace });
  return {
    cluster,
    temporal,
    vsp: new VspClient(temporal),
    repo: (owner) =>
      new RepositoryClient({ url: cluster.repositoryUrl, token: cluster.ownerTokens.get(owner) ?? 'none' }),
    async stop() {
      await cluster.stop();
      await connection.close();
      if (process.env.VSP_KEEP_TEST_DIRS !== '1') await fs.rm(baseDir, { recursive: true, force: true });
    },
  };
}

export async function until<T>(
  what: string,
  fn: () => Promise<T | undefined>,
  timeoutMs = 60_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn().catch(() => undefined);
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}
