import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';
import { withBackend } from '../../repository/store/backend';
import { FileStore, StoreError } from '../../repository/store/fileStore';
import { migratePg, openPgPool } from '../../repository/store/pgMetadata';
import { startPostgres, type TestDatabase } from './postgres';
import { startS3, type TestS3 } from './s3';

/**
 * The repository suite on both storage backends, one suite: the integration files run it on `local`
 * (the default); a file of the `scale` tier runs the same file on `cluster` by calling
 * useClusterBackend() and then requiring it, so every server and admin helper the suite starts finds
 * PostgreSQL and S3 through the VSP_REPOSITORY_* settings.
 */

const CLUSTER_ENV = [
  'VSP_REPOSITORY_BACKEND',
  'VSP_REPOSITORY_PG_URL',
  'VSP_REPOSITORY_S3_ENDPOINT',
  'VSP_REPOSITORY_S3_BUCKET',
  'VSP_REPOSITORY_S3_ACCESS_KEY',
  'VSP_REPOSITORY_S3_SECRET_KEY',
] as const;

export const onClusterBackend = (): boolean => process.env.VSP_REPOSITORY_BACKEND === 'cluster';

/** A test of what only the `local` backend has (its data dir's layout, its SQLite file): skipped on `cluster`. */
export const localOnly = (): jest.It => (onClusterBackend() ? test.skip : test);

/**
 * For a `scale` file that runs an integration file on `cluster`: call it, require the file, then call the
 * returned function (its afterAll runs after the file's, once its servers are closed). A fresh database
 * (migrated as `vsp repository migrate` does) and bucket; the settings are restored afterwards.
 */
export function useClusterBackend(): () => void {
  const saved = Object.fromEntries(CLUSTER_ENV.map((k) => [k, process.env[k]]));
  // Set now: the required file decides at load time which tests are `local` only.
  process.env.VSP_REPOSITORY_BACKEND = 'cluster';
  let db: TestDatabase | undefined;
  let s3: TestS3 | undefined;
  beforeAll(async () => {
    [db, s3] = await Promise.all([startPostgres(), startS3()]);
    const pool = openPgPool(db.url, 1);
    try {
      await migratePg(pool);
    } finally {
      await pool.end();
    }
    Object.assign(process.env, {
      VSP_REPOSITORY_PG_URL: db.url,
      VSP_REPOSITORY_S3_ENDPOINT: s3.settings.endpoint,
      VSP_REPOSITORY_S3_BUCKET: s3.settings.bucket,
      VSP_REPOSITORY_S3_ACCESS_KEY: s3.settings.accessKey,
      VSP_REPOSITORY_S3_SECRET_KEY: s3.settings.secretKey,
    });
  }, 180_000);
  return () =>
    afterAll(async () => {
      for (const k of CLUSTER_ENV) {
        if (saved[k] === undefined) delete process.env[k];
        else process.env[k] = saved[k];
      }
      await Promise.all([db?.stop(), s3?.stop()]);
    }, 120_000);
}

/**
 * `count` repository servers on the `cluster` backend, each with a data dir of its own (under `dirs[i]`),
 * all sharing one fresh database and bucket: `useClusterBackend` with the servers started and closed.
 * Call at a file's top level; the returned object fills in before its tests run.
 */
export function clusterServers(count: number, name: string): { dirs: string[]; servers: RepositoryServer[] } {
  const done = useClusterBackend();
  const fleet: { dirs: string[]; servers: RepositoryServer[] } = { dirs: [], servers: [] };
  beforeAll(async () => {
    fleet.dirs = await Promise.all(
      Array.from({ length: count }, (_, i) => fs.mkdtemp(path.join(os.tmpdir(), `vsp-${name}-${i}-`))),
    );
    fleet.servers = await Promise.all(
      fleet.dirs.map((dataDir) => startRepositoryServer({ dataDir, port: 0 })),
    );
  });
  afterAll(async () => {
    await Promise.all(fleet.servers.map((s) => s.close()));
    await Promise.all(fleet.dirs.map((d) => fs.rm(d, { recursive: true, force: true })));
  });
  done();
  return fleet;
}

/**
 * The bytes stored for `owner`'s `repoPath`, read behind the server's back: from the data dir on `local`,
 * through the backend (PostgreSQL's row, then S3) on `cluster`; undefined if nothing is stored there.
 */
export async function storedBytes(
  dataDir: string,
  owner: string,
  repoPath: string,
): Promise<Buffer | undefined> {
  if (!onClusterBackend())
    return fs.readFile(path.join(dataDir, 'files', owner, ...repoPath.split('/'))).catch((err: unknown) => {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    });
  return withBackend(dataDir, async (b) => {
    const file = await new FileStore(b.metadata, b.bytes).open(owner, repoPath).catch((err: unknown) => {
      if (err instanceof StoreError && err.code === 'not-found') return undefined;
      throw err;
    });
    if (!file) return undefined;
    const chunks: Buffer[] = [];
    for await (const chunk of file.createReadStream()) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  });
}
