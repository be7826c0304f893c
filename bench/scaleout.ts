import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { startPostgresCluster } from '../deploy/postgres/cluster';
import { startSeaweedS3 } from '../deploy/s3/seaweedfs';
import { createLogger, describeError } from '../logging/logger';
import { AccountAdmin, withAdmin } from '../repository/accounts/admin';
import { openMetadata, type BackendSettings } from '../repository/store/backend';
import { migratePg, openPgPool } from '../repository/store/pgMetadata';
import { RepositoryClient } from '../repository/client';
import type { BenchReport } from './report';
import { timed, writeRandomFile } from './repository';
import { backendEnv, startFleet, type Fleet } from './repositoryFleet';

/**
 * Scale-out of the repository (issue 15): the same load through the balancer on 1, 2 and 3 servers of
 * the `cluster` backend (PostgreSQL + S3), beside one server of the `local` backend in the same run; and
 * metadata operations per second with a million file rows in PostgreSQL.
 */

/** How a configuration's servers reach their backend, and how owners are made on it. */
export interface BenchBackend {
  name: 'local' | 'cluster';
  /** The servers' environment (VSP_REPOSITORY_*). */
  env: NodeJS.ProcessEnv;
  /** Makes `names` owners and returns their tokens; `dataDir` is server 0's (the `local` backend's store). */
  addOwners(dataDir: string, names: string[]): Promise<string[]>;
}

export interface LoadOptions {
  /** Clients uploading large files at once, and each file's size. */
  largeClients: number;
  largeMiB: number;
  /** Small-file requests in all, by this many clients at once, each of `smallBytes`. */
  smallRequests: number;
  smallClients: number;
  smallBytes: number;
}

export const QUICK_LOAD: LoadOptions = {
  largeClients: 6,
  largeMiB: 8,
  smallRequests: 600,
  smallClients: 24,
  smallBytes: 4096,
};
export const FULL_LOAD: LoadOptions = {
  largeClients: 12,
  largeMiB: 64,
  smallRequests: 3000,
  smallClients: 48,
  smallBytes: 4096,
};

export interface LoadResult {
  backend: string;
  servers: number;
  'large MiB/s': number;
  'small uploads/s': number;
  'small stats/s': number;
  errors: number;
}

const round1 = (x: number): number => Math.round(x * 10) / 10;

/** Runs `total` calls of `op` from `clients` workers at once; returns calls per second. */
async function rate(total: number, clients: number, op: (i: number) => Promise<unknown>): Promise<number> {
  let next = 0;
  const seconds = await timed(() =>
    Promise.all(
      Array.from({ length: clients }, async () => {
        for (let i = next++; i < total; i = next++) await op(i);
      }),
    ),
  );
  return total / seconds;
}

/**
 * One configuration's figures: large uploads (aggregate MiB/s), then small uploads and stats
 * (requests/s), all over HTTP through the balancer, each client with its own owner.
 */
export async function measureLoad(
  backend: BenchBackend,
  servers: number,
  load: LoadOptions,
  workDir: string,
): Promise<LoadResult> {
  const dir = await fs.mkdtemp(path.join(workDir, `${backend.name}-${servers}-`));
  let fleet: Fleet | undefined;
  try {
    const names = Array.from(
      { length: Math.max(load.largeClients, load.smallClients) },
      (_, i) => `bench${i}`,
    );
    const tokens = await backend.addOwners(path.join(dir, 'server0'), names);
    fleet = await startFleet({
      servers,
      workDir: dir,
      serviceToken: randomBytes(24).toString('base64url'),
      env: () => backend.env,
    });
    const url = fleet.url;
    const clients = names.map((name, i) => ({ name, http: new RepositoryClient({ url, token: tokens[i] }) }));
    const big = path.join(dir, 'large.bin');
    const sha256 = await writeRandomFile(big, load.largeMiB << 20);
    let errors = 0;
    const counted = (p: Promise<unknown>): Promise<unknown> => p.catch(() => void errors++);
    const largeSeconds = await timed(() =>
      Promise.all(
        clients
          .slice(0, load.largeClients)
          .map((c) => counted(c.http.upload(c.name, 'large.bin', big, { sha256 }))),
      ),
    );
    const small = randomBytes(load.smallBytes);
    const smallPath = (i: number): string => `small/${i}.bin`;
    const ownerOf = (i: number) => clients[i % load.smallClients];
    const uploads = await rate(load.smallRequests, load.smallClients, (i) =>
      counted(
        ownerOf(i).http.upload(ownerOf(i).name, smallPath(i), Readable.from([small]), { size: small.length }),
      ),
    );
    const stats = await rate(load.smallRequests, load.smallClients, (i) =>
      counted(ownerOf(i).http.stat(ownerOf(i).name, smallPath(i))),
    );
    return {
      backend: backend.name,
      servers,
      'large MiB/s': round1((load.largeClients * load.largeMiB) / largeSeconds),
      'small uploads/s': Math.round(uploads),
      'small stats/s': Math.round(stats),
      errors,
    };
  } finally {
    await fleet?.close();
    await fs.rm(dir, { recursive: true, force: true });
  }
}

export interface ScaleoutBenchOptions {
  quick: boolean;
  workDir: string;
  /** Where PostgreSQL's and SeaweedFS's output go. */
  logsDir: string;
}

type ClusterSettings = Extract<BackendSettings, { kind: 'cluster' }>;

/** Owners made on the cluster's metadata directly (as `vsp owner add` does with the cluster settings). */
function clusterBackend(settings: BackendSettings): BenchBackend {
  return {
    name: 'cluster',
    env: backendEnv(settings),
    addOwners: async (dataDir, names) => {
      const db = await openMetadata(dataDir, settings);
      try {
        const admin = new AccountAdmin(db);
        const tokens: string[] = [];
        for (const name of names) tokens.push((await admin.addOwner(name)).token);
        return tokens;
      } finally {
        await db.close();
      }
    },
  };
}

export async function benchScaleout(opts: ScaleoutBenchOptions): Promise<BenchReport> {
  const load = opts.quick ? QUICK_LOAD : FULL_LOAD;
  const rows: LoadResult[] = [await measureLoad(LOCAL_BACKEND, 1, load, opts.workDir)];
  const summary: Record<string, string | number> = {
    'local, 1 server: large MiB/s': rows[0]['large MiB/s'],
    'local, 1 server: small uploads/s': rows[0]['small uploads/s'],
  };
  let metadata: Record<string, string | number>[] = [];
  const pg = await startPostgresCluster({
    dir: path.join(opts.workDir, 'postgres'),
    logFile: path.join(opts.logsDir, 'scaleout-postgres.log'),
    noFsync: false,
  });
  try {
    const s3 = await startSeaweedS3({ logFile: path.join(opts.logsDir, 'scaleout-weed.log') });
    try {
      const settingsFor = async (name: string): Promise<ClusterSettings> => {
        const pgUrl = await pg.createDatabase(name);
        const pool = openPgPool(pgUrl, 1);
        try {
          await migratePg(pool);
        } finally {
          await pool.end();
        }
        return { kind: 'cluster', pgUrl, s3: await s3.bucket(name.replace(/_/g, '-')) };
      };
      for (const servers of [1, 2, 3]) {
        const r = await measureLoad(
          clusterBackend(await settingsFor(`load_${servers}`)),
          servers,
          load,
          opts.workDir,
        );
        rows.push(r);
        summary[`cluster, ${servers} servers: large MiB/s`] = r['large MiB/s'];
        summary[`cluster, ${servers} servers: small uploads/s`] = r['small uploads/s'];
      }
      const settings = await settingsFor('metadata');
      metadata = await measureMetadata({
        quick: opts.quick,
        workDir: opts.workDir,
        cluster: clusterBackend(settings),
        bulkLoad: (owners, n, seed) => copyFileRows(settings.pgUrl, owners, n, seed),
      });
      summary['bulk load (COPY) s'] = metadata[0]['bulk load s'];
      for (const m of metadata) {
        summary[`${m['file rows']} rows, ${m.servers} servers: stat ops/s`] = m['stat ops/s'];
        summary[`${m['file rows']} rows, ${m.servers} servers: list ops/s`] = m['list ops/s'];
      }
    } finally {
      await s3.stop();
    }
  } catch (err) {
    summary['cluster backend'] = `not measured: ${describeError(err)}`;
    createLogger('bench.scaleout').error({ err: describeError(err) }, 'cluster backend not measured');
  } finally {
    await pg.stop();
  }
  return {
    name: 'scaleout',
    title: 'Repository scale-out: 1, 2, 3 servers behind the balancer; metadata with many rows',
    method:
      `Servers are separate processes (node dist/repository/main.js) behind the project's TCP balancer ` +
      `(deploy/balancer/), all on this machine with the clients, PostgreSQL (fsync on) and SeaweedFS. Large: ` +
      `${load.largeClients} clients each upload a ${load.largeMiB} MiB file at once over HTTP (SHA-256 ` +
      `checked), aggregate MiB/s over the wall time. Small: ${load.smallRequests} uploads of ` +
      `${load.smallBytes} bytes by ${load.smallClients} clients at once, then as many stats of them; ` +
      `requests/s. The local backend (SQLite + disk) runs one server (it is one machine's store); the cluster ` +
      `backend (PostgreSQL + S3) runs 1, 2 and 3, each on a fresh database and bucket. Metadata: file rows ` +
      `bulk-loaded with psql COPY (10 owners, ${FOLDER_FILES} files per folder, all naming one 4 KiB object), ` +
      `then 32 clients stat one file (HEAD: a row lookup and the object's S3 HEAD) or list one folder each ` +
      `request, over HTTP through the balancer to 1 and 3 servers.`,
    rows: [
      ...rows.map((r) => ({ ...r, 'stat ops/s': '', 'list ops/s': '', 'file rows': '' })),
      ...metadata.map((m) => ({
        backend: 'cluster',
        servers: m.servers,
        'large MiB/s': '',
        'small uploads/s': '',
        'small stats/s': '',
        errors: m['wrong answers'],
        'stat ops/s': m['stat ops/s'],
        'list ops/s': m['list ops/s'],
        'file rows': m['file rows'],
      })),
    ],
    summary,
  };
}

export interface MetadataBenchOptions {
  quick: boolean;
  workDir: string;
  cluster: BenchBackend;
  /**
   * Loads `rows` file rows for `owners` (paths `d<folder>/f<n>.bin`, FOLDER_FILES per folder) by COPY,
   * every one naming the bytes of `seed` (owners[0]'s file, stored through the repository): a stat checks
   * its object is there, and a million objects would measure the object store, not the metadata.
   */
  bulkLoad(owners: string[], rows: number, seed: string): Promise<void>;
}

/** Files per folder in the bulk-loaded rows: what one `list` returns. */
export const FOLDER_FILES = 100;

/**
 * Metadata operations per second with `rows` file rows in PostgreSQL: random stats (one file) and lists
 * (one folder of FOLDER_FILES files), over HTTP through the balancer to 1 and 3 cluster servers.
 */
export async function measureMetadata(
  opts: MetadataBenchOptions,
): Promise<Record<string, string | number>[]> {
  const rows = opts.quick ? 200_000 : 1_000_000;
  const ops = opts.quick ? 1000 : 4000;
  const clients = 32;
  const owners = Array.from({ length: 10 }, (_, i) => `meta${i}`);
  const dir = await fs.mkdtemp(path.join(opts.workDir, 'metadata-'));
  try {
    const tokens = await opts.cluster.addOwners(path.join(dir, 'server0'), owners);
    let loadSeconds = 0;
    const perOwner = rows / owners.length;
    const out: Record<string, string | number>[] = [];
    for (const servers of [1, 3]) {
      const fleet = await startFleet({
        servers,
        workDir: path.join(dir, `fleet${servers}`),
        serviceToken: randomBytes(24).toString('base64url'),
        env: () => opts.cluster.env,
      });
      try {
        const http = tokens.map((token) => new RepositoryClient({ url: fleet.url, token }));
        if (servers === 1) {
          await http[0].upload(owners[0], 'seed.bin', Readable.from([randomBytes(4096)]), { size: 4096 });
          loadSeconds = await timed(() => opts.bulkLoad(owners, rows, 'seed.bin'));
        }
        // A fixed spread of owners and files, the same for every configuration.
        const pick = (i: number): { o: number; n: number } => ({
          o: i % owners.length,
          n: (i * 7919) % perOwner,
        });
        const folderOf = (n: number): string => `d${Math.floor(n / FOLDER_FILES)}/`;
        let errors = 0;
        const stats = await rate(ops, clients, async (i) => {
          const { o, n } = pick(i);
          const info = await http[o].stat(owners[o], `${folderOf(n)}f${n % FOLDER_FILES}.bin`);
          if (!info) errors++;
        });
        const lists = await rate(ops, clients, async (i) => {
          const { o, n } = pick(i);
          if ((await http[o].list(owners[o], folderOf(n))).length !== FOLDER_FILES) errors++;
        });
        out.push({
          'file rows': rows,
          servers,
          'stat ops/s': Math.round(stats),
          'list ops/s': Math.round(lists),
          'bulk load s': round1(loadSeconds),
          'wrong answers': errors,
        });
      } finally {
        await fleet.close();
      }
    }
    return out;
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/**
 * Bulk-loads file rows with `psql ... COPY files FROM STDIN` (PostgreSQL's bulk path): `rows` in all,
 * spread evenly over `owners`, FOLDER_FILES per folder, all naming the object of owners[0]'s `seed`.
 */
export async function copyFileRows(
  pgUrl: string,
  owners: string[],
  rows: number,
  seed: string,
): Promise<void> {
  const pool = openPgPool(pgUrl, 1);
  let file: { size: number; sha256: string; blob: string };
  try {
    const { rows: found } = await pool.query<{ size: number; sha256: string; blob: string }>(
      'SELECT size, sha256, blob FROM files WHERE owner = $1 AND path = $2',
      [owners[0], seed],
    );
    if (found.length !== 1) throw new Error(`no file ${seed} of ${owners[0]} to bulk-load rows after`);
    file = found[0];
  } finally {
    await pool.end();
  }
  const child = spawn(
    'psql',
    [pgUrl, '-v', 'ON_ERROR_STOP=1', '-c', 'COPY files (owner, path, size, sha256, mtime, blob) FROM STDIN'],
    { stdio: ['pipe', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', resolve);
  });
  const mtime = new Date().toISOString();
  const perOwner = Math.ceil(rows / owners.length);
  function* lines(): Generator<string> {
    for (const owner of owners) {
      let batch = '';
      for (let n = 0; n < perOwner; n++) {
        batch += `${owner}\td${Math.floor(n / FOLDER_FILES)}/f${n % FOLDER_FILES}.bin\t${file.size}\t${file.sha256}\t${mtime}\t${file.blob}\n`;
        if (n % 10_000 === 9_999) {
          yield batch;
          batch = '';
        }
      }
      if (batch !== '') yield batch;
    }
  }
  await new Promise<void>((resolve, reject) => {
    const input = Readable.from(lines());
    input.once('error', reject);
    child.stdin.once('error', reject);
    child.stdin.once('finish', resolve);
    input.pipe(child.stdin);
  });
  const code = await exited;
  if (code !== 0) throw new Error(`psql COPY exited with ${code}: ${stderr.trim()}`);
}

/** The `local` backend: owners made in server 0's data dir before it starts. */
export const LOCAL_BACKEND: BenchBackend = {
  name: 'local',
  env: { VSP_REPOSITORY_BACKEND: 'local' },
  addOwners: async (dataDir, names) =>
    withAdmin(dataDir, async (admin) => {
      const tokens: string[] = [];
      for (const name of names) tokens.push((await admin.addOwner(name)).token);
      return tokens;
    }),
};
