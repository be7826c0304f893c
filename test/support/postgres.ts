import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import {
  startPostgresCluster,
  uniqueDatabaseName,
  type PostgresCluster,
} from '../../deploy/postgres/cluster';
import { testLogDir } from './testRun';

export interface TestDatabase {
  /** postgres://role:password@127.0.0.1:port/name: a fresh database, owned by a role of its own. */
  url: string;
  /** Drops the database; the last one of this test file stops the cluster too. */
  stop(): Promise<void>;
}

/** One throw-away cluster per test file, shared by its databases; started by the first call. */
let shared: { cluster: Promise<PostgresCluster>; tmp: string; users: number } | undefined;

/**
 * A fresh database on a private PostgreSQL cluster (deploy/postgres/). The cluster runs without fsync
 * (nothing in it outlives the test) and logs to the run's log folder.
 */
export async function startPostgres(): Promise<TestDatabase> {
  if (!shared) {
    const tmp = mkdtempSync(path.join(os.tmpdir(), 'vsp-pg-'));
    // Run as root, the server runs as `postgres`, which must reach its data directory below this one.
    chmodSync(tmp, 0o755);
    const logFile = path.join(testLogDir(), `postgres-${path.basename(tmp)}.log`);
    const cluster = startPostgresCluster({ dir: path.join(tmp, 'data'), logFile, noFsync: true });
    shared = { cluster, tmp, users: 0 };
    cluster.catch(() => {
      rmSync(tmp, { recursive: true, force: true });
      shared = undefined;
    });
  }
  const mine = shared;
  mine.users += 1;
  let cluster: PostgresCluster;
  let name: string;
  let url: string;
  try {
    cluster = await mine.cluster;
    name = uniqueDatabaseName('vsp_test');
    url = await cluster.createDatabase(name);
  } catch (err) {
    await release(mine);
    throw err;
  }
  let stopped = false;
  return {
    url,
    stop: async () => {
      if (stopped) return;
      stopped = true;
      try {
        await cluster.dropDatabase(name);
      } finally {
        await release(mine);
      }
    },
  };
}

async function release(mine: NonNullable<typeof shared>): Promise<void> {
  mine.users -= 1;
  if (mine.users > 0) return;
  if (shared === mine) shared = undefined;
  const cluster = await mine.cluster.catch(() => undefined);
  try {
    await cluster?.stop();
  } finally {
    rmSync(mine.tmp, { recursive: true, force: true });
  }
}
