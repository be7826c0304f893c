import type { Readable } from 'node:stream';
import { MetadataDb } from './metadataDb';
import { localMetadata, type MetadataStore, type StoredFile } from './metadataStore';

/**
 * The repository's storage backend: its metadata (metadataStore.ts) and its file bytes (FileBytes), chosen
 * by VSP_REPOSITORY_BACKEND. `local` (the default, the demo's): SQLite and files in the data dir, one
 * server. `cluster`: PostgreSQL and an S3 object store shared by any number of stateless servers; the data
 * dir then holds only per-server things (host keys, certificates, temp files).
 *
 * Settings (environment): VSP_REPOSITORY_BACKEND=local|cluster; for `cluster`, VSP_REPOSITORY_PG_URL
 * (postgres://...), VSP_REPOSITORY_S3_ENDPOINT (http(s)://host:port), VSP_REPOSITORY_S3_BUCKET,
 * VSP_REPOSITORY_S3_ACCESS_KEY, VSP_REPOSITORY_S3_SECRET_KEY, VSP_REPOSITORY_S3_REGION (default us-east-1).
 */

export interface S3Settings {
  endpoint: string;
  bucket: string;
  accessKey: string;
  secretKey: string;
  region: string;
}

export type BackendSettings = { kind: 'local' } | { kind: 'cluster'; pgUrl: string; s3: S3Settings };

/** Validates the backend settings, naming the variable at fault. */
export function backendSettingsFromEnv(env: NodeJS.ProcessEnv): BackendSettings {
  const kind = env.VSP_REPOSITORY_BACKEND || 'local';
  if (kind === 'local') return { kind };
  if (kind !== 'cluster')
    throw new Error(`VSP_REPOSITORY_BACKEND=${JSON.stringify(kind)} must be local or cluster`);
  const need = (name: string): string => {
    const v = env[name];
    if (!v) throw new Error(`${name} is required when VSP_REPOSITORY_BACKEND=cluster`);
    return v;
  };
  const pgUrl = need('VSP_REPOSITORY_PG_URL');
  if (!/^postgres(ql)?:\/\//.test(pgUrl))
    throw new Error('VSP_REPOSITORY_PG_URL must be a postgres:// (or postgresql://) URL');
  const endpoint = need('VSP_REPOSITORY_S3_ENDPOINT');
  if (!/^https?:\/\/[^/]+\/?$/.test(endpoint))
    throw new Error(
      `VSP_REPOSITORY_S3_ENDPOINT=${JSON.stringify(endpoint)} must be http(s)://host:port (no path)`,
    );
  const bucket = need('VSP_REPOSITORY_S3_BUCKET');
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket))
    throw new Error(`VSP_REPOSITORY_S3_BUCKET=${JSON.stringify(bucket)} is not a valid bucket name`);
  return {
    kind,
    pgUrl,
    s3: {
      endpoint,
      bucket,
      accessKey: need('VSP_REPOSITORY_S3_ACCESS_KEY'),
      secretKey: need('VSP_REPOSITORY_S3_SECRET_KEY'),
      region: env.VSP_REPOSITORY_S3_REGION || 'us-east-1',
    },
  };
}

/** What a byte stream turned out to be once received. */
export interface Received {
  size: number;
  sha256: string;
}

export interface ReceiveOptions {
  maxBytes: number;
  tooLarge: (max: number) => Error;
  /** Called with the running total before each chunk is kept; a throw refuses the stream. */
  onChunk?: (total: number) => void;
}

/** Bytes received but not yet an owner's file: a temp file (`local`) or an unreferenced object (`cluster`). */
export interface Staged extends Received {
  /** Where the bytes are; meaningful only to the FileBytes that made it. */
  ref: string;
}

/** Reads one stored file; the stream and `read` are FileStore's OpenFile's. */
export interface OpenBytes {
  createReadStream(range?: { start: number; end: number }): Readable;
  read(position: number, length: number): Promise<Buffer>;
  close(): Promise<void>;
}

/**
 * Where the owners' file bytes live. FileStore keeps the rules (paths, quotas, base images, listeners)
 * and the metadata; this only moves bytes. A write is: `receive` (bytes durable in a staging place, the
 * size and hash counted) → `install` inside the metadata transaction that records the row (returns the
 * object key to record, if any) → `release` of what the row replaced, after the commit.
 */
export interface FileBytes {
  /**
   * Receives `source` into a staging place, then runs `commit` with it. If receiving or `commit` fails,
   * the staged bytes are removed (unless `commit` installed them) and `source` is destroyed.
   */
  receive<T>(source: Readable, opts: ReceiveOptions, commit: (staged: Staged) => Promise<T>): Promise<T>;
  /**
   * Stages a complete local file whose size and SHA-256 the caller counted (a resumable upload's partial
   * file): `local` takes it as it is (it is renamed into place, never copied), `cluster` uploads it. The
   * file is consumed when it is installed; the caller removes it otherwise.
   */
  stageLocalFile(file: string, sum: Received): Promise<Staged>;
  /** Removes staged bytes that were not installed. */
  discard(staged: Staged): Promise<void>;
  /** Makes `staged` the bytes of `owner`'s `repoPath`; run inside the transaction that records the row. */
  install(owner: string, repoPath: string, staged: Staged): Promise<string | undefined>;
  /** Opens a stored file's bytes, checking they are there and of the recorded size. */
  open(owner: string, file: StoredFile): Promise<OpenBytes>;
  /** Forgets the bytes of a file whose row is gone or replaced (a replaced file's by its key only). */
  release(owner: string, file: StoredFile, stillAtPath: boolean): Promise<void>;
  /** A file or folder renamed; run inside the transaction that renames the rows. */
  move(owner: string, from: string, to: string, kind: 'file' | 'folder'): Promise<void>;
  /**
   * Runs `fn` on a local path holding exactly the bytes of `file` (for qemu-img): `local` passes its own
   * descriptor's /proc path, `cluster` a temp copy removed afterwards.
   */
  withLocalFile<T>(owner: string, file: StoredFile, fn: (localPath: string) => Promise<T>): Promise<T>;
  /** The provider's base images: opened by name; added from a complete local file (consumed); removed. */
  openBase(name: string, size: number): Promise<OpenBytes>;
  installBase(name: string, localFile: string): Promise<void>;
  removeBase(name: string): Promise<void>;
  /** A temp file path on this server's disk, for bytes on their way in (base images, inspections). */
  tempPath(): string;
  close(): Promise<void>;
}

export interface RepositoryBackend {
  settings: BackendSettings;
  metadata: MetadataStore;
  bytes: FileBytes;
  close(): Promise<void>;
}

/** Opens the metadata alone (the admin CLI, task admission). */
export async function openMetadata(dataDir: string, settings: BackendSettings): Promise<MetadataStore> {
  if (settings.kind === 'local') return localMetadata(MetadataDb.open(dataDir));
  const { PgMetadata } = await import('./pgMetadata.js');
  return PgMetadata.open(settings.pgUrl);
}

/**
 * Opens the backend the settings name: `local` on `dataDir`; `cluster` on PostgreSQL and S3. A server
 * (`serving`) owns its data dir's temp files and clears those a crash left; the admin CLI does not.
 */
export async function openBackend(
  dataDir: string,
  settings: BackendSettings,
  { serving = true }: { serving?: boolean } = {},
): Promise<RepositoryBackend> {
  const metadata = await openMetadata(dataDir, settings);
  try {
    const bytes =
      settings.kind === 'local'
        ? await (await import('./diskBytes.js')).DiskBytes.open(dataDir, serving)
        : await (await import('./s3Bytes.js')).S3Bytes.open(dataDir, settings.s3, serving);
    return {
      settings,
      metadata,
      bytes,
      close: async () => {
        await bytes.close();
        await metadata.close();
      },
    };
  } catch (err) {
    await metadata.close();
    throw err;
  }
}

/** Runs `fn` on the backend the VSP_REPOSITORY_* settings name, opened for the call (the admin CLI's). */
export async function withBackend<T>(
  dataDir: string,
  fn: (backend: RepositoryBackend) => Promise<T>,
): Promise<T> {
  const backend = await openBackend(dataDir, backendSettingsFromEnv(process.env), { serving: false });
  try {
    return await fn(backend);
  } finally {
    await backend.close();
  }
}

/** What `vsp repository migrate` did. */
export interface MigrationReport {
  backend: BackendSettings['kind'];
  fromVersion: number;
  toVersion: number;
  /** `cluster`: whether the S3 bucket had to be created. */
  bucketCreated?: boolean;
}

/**
 * Brings the backend's schema to this VSP's version (`vsp repository migrate`). `local` migrates its
 * SQLite file (servers also do so when they start); `cluster` applies the missing PostgreSQL steps under
 * an advisory lock and creates the S3 bucket if it is missing. Servers on `cluster` refuse any schema but
 * their own, so the operator runs this once per upgrade, before the new servers start.
 */
export async function migrateRepository(
  dataDir: string,
  settings: BackendSettings,
): Promise<MigrationReport> {
  if (settings.kind === 'local') {
    const { from, to } = MetadataDb.migrate(dataDir);
    return { backend: 'local', fromVersion: from, toVersion: to };
  }
  const { migratePg, openPgPool } = await import('./pgMetadata.js');
  const { ensureBucket } = await import('./s3Bytes.js');
  const pool = openPgPool(settings.pgUrl, 1);
  try {
    const { from, to } = await migratePg(pool);
    return {
      backend: 'cluster',
      fromVersion: from,
      toVersion: to,
      bucketCreated: await ensureBucket(settings.s3),
    };
  } finally {
    await pool.end();
  }
}
