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
  /** Makes `staged` the bytes of `owner`'s `repoPath`; run inside the transaction that records the row. */
  install(owner: string, repoPath: string, staged: Staged): Promise<string | undefined>;
  /** Opens a stored file's bytes, checking they are there and of the recorded size. */
  open(owner: string, file: StoredFile): Promise<OpenBytes>;
  /** Forgets the bytes of a file whose row is gone or replaced (a replaced file's by its key only). */
  release(owner: string, file: StoredFile, stillAtPath: boolean): Promise<void>;
  /** A file or folder renamed; run inside the transaction that renames the rows. */
  move(owner: string, from: string, to: string, kind: 'file' | 'folder'): Promise<void>;
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
