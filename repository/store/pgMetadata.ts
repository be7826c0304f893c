import { Pool, types, type PoolClient, type QueryResultRow } from 'pg';
import {
  CAPABILITY_COLUMNS,
  OWNER_COLUMNS,
  toCapabilityRow,
  toImageInfoRow,
  toOwnerRow,
  toTokenRow,
  type AdminTokenRow,
  type BaseImageRow,
  type CapabilityRow,
  type FileRow,
  type ImageInfoRow,
  type OwnerRow,
  type OwnerUsage,
  type RawCapability,
  type RawImageInfo,
  type RawOwner,
  type RawToken,
  type SshKeyRow,
  type TokenRow,
  type UploadSessionRow,
} from './metadataDb';
import type { MetadataStore, StoredFile } from './metadataStore';
import { LIVE_LOG_TABLES } from '../tasks/pgLiveLogs';
import { inTransaction } from './pgTransaction';
import { AUDIT_LOG_TABLE } from '../accounts/auditShipper';

/**
 * The `cluster` backend's metadata: the same rows as the SQLite database, in PostgreSQL, shared by any
 * number of stateless repository servers. Paths sort and compare bytewise (COLLATE "C", as in SQLite) so
 * listings are the same on both backends. Each owner's usage is a counter on its row, kept by statement
 * triggers on `files` (so bulk loads keep it too); a commit locks that row (`lockOwner`) before it checks
 * the quota, so two servers cannot both fit the last bytes.
 *
 * The schema is versioned (`vsp_schema`): `migratePg` applies the missing steps under an advisory lock
 * (`vsp repository migrate`); a server refuses to start on a schema other than its own.
 */

/** Appended to, never edited: a step's index + 1 is the schema version it makes. */
export const PG_MIGRATIONS: readonly string[] = [
  `
CREATE TABLE owners (
  name TEXT COLLATE "C" PRIMARY KEY,
  created TEXT NOT NULL,
  disabled BOOLEAN NOT NULL DEFAULT false,
  password_hash TEXT,
  quota_bytes BIGINT,
  quota_files BIGINT,
  used_bytes BIGINT NOT NULL DEFAULT 0,
  used_files BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE tokens (
  id BIGSERIAL PRIMARY KEY,
  owner TEXT COLLATE "C" REFERENCES owners(name),
  service BOOLEAN NOT NULL,
  name TEXT NOT NULL,
  hash TEXT NOT NULL UNIQUE,
  created TEXT NOT NULL,
  revoked TEXT,
  CHECK ((service AND owner IS NULL) OR (NOT service AND owner IS NOT NULL))
);
CREATE TABLE files (
  owner TEXT COLLATE "C" NOT NULL REFERENCES owners(name),
  path TEXT COLLATE "C" NOT NULL,
  size BIGINT NOT NULL,
  sha256 TEXT NOT NULL,
  mtime TEXT NOT NULL,
  blob TEXT,
  PRIMARY KEY (owner, path)
);
CREATE TABLE ssh_keys (
  id BIGSERIAL PRIMARY KEY,
  owner TEXT COLLATE "C" NOT NULL REFERENCES owners(name),
  name TEXT NOT NULL,
  algorithm TEXT NOT NULL,
  key_data TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  created TEXT NOT NULL,
  UNIQUE (owner, key_data)
);
CREATE TABLE folders (
  owner TEXT COLLATE "C" NOT NULL REFERENCES owners(name),
  path TEXT COLLATE "C" NOT NULL,
  PRIMARY KEY (owner, path)
);
CREATE TABLE admin_tokens (
  id BIGSERIAL PRIMARY KEY,
  name TEXT NOT NULL,
  hash TEXT NOT NULL UNIQUE,
  created TEXT NOT NULL,
  revoked TEXT
);
CREATE TABLE base_images (
  name TEXT COLLATE "C" PRIMARY KEY,
  size BIGINT NOT NULL,
  sha256 TEXT NOT NULL,
  mtime TEXT NOT NULL,
  blob TEXT
);
CREATE TABLE image_info (
  sha256 TEXT PRIMARY KEY,
  status TEXT NOT NULL CHECK (status IN ('ok', 'invalid')),
  format TEXT,
  virtual_bytes BIGINT,
  actual_bytes BIGINT,
  has_backing BOOLEAN,
  error TEXT,
  inspected TEXT NOT NULL
);
CREATE TABLE upload_sessions (
  id TEXT PRIMARY KEY,
  owner TEXT COLLATE "C" NOT NULL REFERENCES owners(name),
  path TEXT NOT NULL,
  size BIGINT NOT NULL,
  sha256 TEXT,
  received BIGINT NOT NULL,
  expires_at BIGINT NOT NULL
);
CREATE TABLE capabilities (
  id TEXT PRIMARY KEY,
  owner TEXT COLLATE "C" NOT NULL REFERENCES owners(name),
  task_id TEXT NOT NULL,
  results TEXT NOT NULL,
  expires BIGINT NOT NULL,
  created TEXT NOT NULL,
  minted_by TEXT NOT NULL,
  revoked TEXT
);
CREATE INDEX capabilities_by_task ON capabilities (task_id);
CREATE INDEX capabilities_by_owner ON capabilities (owner, expires);
CREATE FUNCTION files_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') THEN
    UPDATE owners o SET used_bytes = o.used_bytes - d.b, used_files = o.used_files - d.n
      FROM (SELECT owner, SUM(size) AS b, COUNT(*) AS n FROM old_rows GROUP BY owner) d
      WHERE o.name = d.owner;
  END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') THEN
    UPDATE owners o SET used_bytes = o.used_bytes + d.b, used_files = o.used_files + d.n
      FROM (SELECT owner, SUM(size) AS b, COUNT(*) AS n FROM new_rows GROUP BY owner) d
      WHERE o.name = d.owner;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER files_usage_insert AFTER INSERT ON files
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION files_usage();
CREATE TRIGGER files_usage_update AFTER UPDATE ON files
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION files_usage();
CREATE TRIGGER files_usage_delete AFTER DELETE ON files
  REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION files_usage();
`,
  // Resumable uploads shared by all servers: each acknowledged append is one object, in offset order.
  `
CREATE TABLE upload_parts (
  upload_id TEXT NOT NULL REFERENCES upload_sessions(id) ON DELETE CASCADE,
  start BIGINT NOT NULL,
  size BIGINT NOT NULL,
  blob TEXT NOT NULL,
  PRIMARY KEY (upload_id, start)
);
`,
  // Live logs shared by all servers (tasks/pgLiveLogs.ts).
  LIVE_LOG_TABLES,
  // The login throttle's failures and lockouts, shared by every server (accounts/loginThrottle.ts).
  `
CREATE TABLE login_throttle (
  key TEXT PRIMARY KEY,
  failures BIGINT[] NOT NULL,
  locked_until BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX login_throttle_locked_until ON login_throttle (locked_until);
`,
  // Every server's audit events, shipped from its own file (accounts/auditShipper.ts).
  AUDIT_LOG_TABLE,
];

export const PG_SCHEMA_VERSION = PG_MIGRATIONS.length;

// BIGINT and COUNT(*) arrive as strings by default; every such value here is a size, count or time that
// fits a double exactly (sizes are checked against Number.MAX_SAFE_INTEGER before they are stored).
const INT8_OID = 20;
const parseInt8 = (v: string): number => Number(v);

/** A pool on `url` whose BIGINTs are numbers: the repository's and the throttle store's. */
export function openPgPool(url: string, max = 10): Pool {
  return new Pool({
    connectionString: url,
    max,
    types: {
      getTypeParser: ((oid: number, format?: 'text' | 'binary') =>
        oid === INT8_OID ? parseInt8 : types.getTypeParser(oid, format)) as typeof types.getTypeParser,
    },
  });
}

/** The schema version of the database at `pool` (0 when it has none yet). */
export async function pgSchemaVersion(pool: Pool): Promise<number> {
  const { rows } = await pool.query<{ t: string | null }>("SELECT to_regclass('vsp_schema') AS t");
  if (rows[0]?.t === null) return 0;
  const v = await pool.query<{ v: number | null }>('SELECT MAX(version) AS v FROM vsp_schema');
  return Number(v.rows[0]?.v ?? 0);
}

/**
 * Applies the migrations the database lacks, each in its own transaction, under an advisory lock so
 * servers and `vsp repository migrate` started together apply each step once. Other modules' tables
 * on this database (the login throttle's) are steps of PG_MIGRATIONS too. Returns the versions before
 * and after.
 */
export async function migratePg(pool: Pool): Promise<{ from: number; to: number }> {
  return inTransaction(pool, async (c) => {
    await c.query('SELECT pg_advisory_xact_lock(8420)');
    await c.query(
      'CREATE TABLE IF NOT EXISTS vsp_schema (version INTEGER PRIMARY KEY, applied TEXT NOT NULL)',
    );
    const { rows } = await c.query<{ v: number | null }>('SELECT MAX(version) AS v FROM vsp_schema');
    const from = Number(rows[0]?.v ?? 0);
    if (from > PG_SCHEMA_VERSION)
      throw new Error(
        `the repository database has schema ${from}, newer than this VSP (${PG_SCHEMA_VERSION})`,
      );
    for (let v = from + 1; v <= PG_SCHEMA_VERSION; v++) {
      await c.query(PG_MIGRATIONS[v - 1]);
      await c.query('INSERT INTO vsp_schema (version, applied) VALUES ($1, $2)', [
        v,
        new Date().toISOString(),
      ]);
    }
    return { from, to: PG_SCHEMA_VERSION };
  });
}

/** Runs one query; `Queryable` is a pool or a transaction's client. */
type Queryable = Pick<Pool, 'query'> | PoolClient;

const now = (): string => new Date().toISOString();
const orNull = <T>(v: T | undefined): T | null => (v === undefined ? null : v);
const orUndef = <T>(v: T | null): T | undefined => (v === null ? undefined : v);

/** The first code point past every string that starts with `prefix` (for an index range scan). */
function prefixEnd(prefix: string): string | undefined {
  const last = prefix.codePointAt(prefix.length - 1);
  if (last === undefined || last >= 0x10ffff) return undefined;
  const cut = last > 0xffff ? 2 : 1;
  return prefix.slice(0, prefix.length - cut) + String.fromCodePoint(last + 1);
}

/** `path` starts with the parameter `$n` (and `$n+1` bounds the range when there is one). */
function prefixClause(prefix: string, n: number): { sql: string; params: string[] } {
  if (prefix === '') return { sql: 'TRUE', params: [] };
  const end = prefixEnd(prefix);
  return end === undefined
    ? { sql: `starts_with(path, $${n})`, params: [prefix] }
    : { sql: `path >= $${n} AND path < $${n + 1}`, params: [prefix, end] };
}

export class PgMetadata implements MetadataStore {
  readonly kind = 'cluster' as const;

  /** `q` is the pool, or inside `transaction` the transaction's client; `pool` owns the connections. */
  private constructor(
    private readonly q: Queryable,
    private readonly pool: Pool,
    private readonly inTx: boolean,
  ) {}

  /** Connects and checks the schema is this VSP's (run `vsp repository migrate` first). */
  static async open(url: string): Promise<PgMetadata> {
    const pool = openPgPool(url);
    try {
      const version = await pgSchemaVersion(pool);
      if (version !== PG_SCHEMA_VERSION)
        throw new Error(
          `the repository database has schema ${version} but this VSP needs ${PG_SCHEMA_VERSION}: ` +
            'run `vsp repository migrate`',
        );
    } catch (err) {
      await pool.end();
      throw err;
    }
    return new PgMetadata(pool, pool, false);
  }

  /** For stores that share the repository's database (the login throttle's). */
  get sharedPool(): Pool {
    return this.pool;
  }

  async close(): Promise<void> {
    if (!this.inTx) await this.pool.end();
  }

  transaction<T>(fn: (tx: MetadataStore) => Promise<T>): Promise<T> {
    if (this.inTx) return fn(this);
    return inTransaction(this.pool, (client) => fn(new PgMetadata(client, this.pool, true)));
  }

  private async rows<R extends QueryResultRow>(sql: string, params: unknown[] = []): Promise<R[]> {
    return (await this.q.query<R>(sql, params)).rows;
  }

  private async one<R extends QueryResultRow>(sql: string, params: unknown[] = []): Promise<R | undefined> {
    return (await this.rows<R>(sql, params))[0];
  }

  private async changed(sql: string, params: unknown[] = []): Promise<number> {
    return (await this.q.query(sql, params)).rowCount ?? 0;
  }

  // --- owners ---

  async getOwner(name: string): Promise<OwnerRow | undefined> {
    const r = await this.one<RawOwner>(`SELECT ${OWNER_COLUMNS} FROM owners WHERE name = $1`, [name]);
    return r && toOwnerRow(r);
  }

  /** Inside a transaction: holds the owner's row (and so its usage counter) until it ends. */
  async lockOwner(name: string): Promise<OwnerRow | undefined> {
    const r = await this.one<RawOwner>(`SELECT ${OWNER_COLUMNS} FROM owners WHERE name = $1 FOR UPDATE`, [
      name,
    ]);
    return r && toOwnerRow(r);
  }

  async listOwners(): Promise<(OwnerRow & { activeTokens: number; sshKeys: number })[]> {
    const rows = await this.rows<RawOwner & { active_tokens: number; ssh_keys: number }>(
      `SELECT ${OWNER_COLUMNS},
         (SELECT COUNT(*) FROM tokens t WHERE t.owner = o.name AND t.revoked IS NULL) AS active_tokens,
         (SELECT COUNT(*) FROM ssh_keys k WHERE k.owner = o.name) AS ssh_keys
       FROM owners o ORDER BY o.name`,
    );
    return rows.map((r) => ({ ...toOwnerRow(r), activeTokens: r.active_tokens, sshKeys: r.ssh_keys }));
  }

  async getPasswordHash(owner: string): Promise<string | undefined> {
    const r = await this.one<{ password_hash: string | null }>(
      'SELECT password_hash FROM owners WHERE name = $1',
      [owner],
    );
    return r?.password_hash ?? undefined;
  }

  async setPasswordHash(owner: string, hash: string | undefined): Promise<boolean> {
    return (
      (await this.changed('UPDATE owners SET password_hash = $1 WHERE name = $2', [orNull(hash), owner])) ===
      1
    );
  }

  async setQuota(owner: string, quota: { bytes?: number; files?: number }): Promise<boolean> {
    return (
      (await this.changed('UPDATE owners SET quota_bytes = $1, quota_files = $2 WHERE name = $3', [
        orNull(quota.bytes),
        orNull(quota.files),
        owner,
      ])) === 1
    );
  }

  async usage(owner: string): Promise<OwnerUsage> {
    const r = await this.one<{ bytes: number; files: number }>(
      'SELECT used_bytes AS bytes, used_files AS files FROM owners WHERE name = $1',
      [owner],
    );
    return r ?? { bytes: 0, files: 0 };
  }

  async insertOwner(name: string): Promise<boolean> {
    return (
      (await this.changed(
        'INSERT INTO owners (name, created) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING',
        [name, now()],
      )) === 1
    );
  }

  async setOwnerDisabled(name: string, disabled: boolean): Promise<boolean> {
    return (await this.changed('UPDATE owners SET disabled = $1 WHERE name = $2', [disabled, name])) === 1;
  }

  // --- tokens ---

  async insertToken(owner: string | undefined, name: string, hash: string): Promise<number> {
    const r = await this.one<{ id: number }>(
      'INSERT INTO tokens (owner, service, name, hash, created) VALUES ($1, $2, $3, $4, $5) RETURNING id',
      [orNull(owner), owner === undefined, name, hash, now()],
    );
    return (r as { id: number }).id;
  }

  async findTokenByHash(hash: string): Promise<(TokenRow & { hash: string }) | undefined> {
    const r = await this.one<RawToken>(
      'SELECT id, owner, name, created, revoked, hash FROM tokens WHERE hash = $1',
      [hash],
    );
    return r && { ...toTokenRow(r), hash: r.hash };
  }

  async listTokens(owner?: string): Promise<TokenRow[]> {
    const rows =
      owner === undefined
        ? await this.rows<RawToken>('SELECT id, owner, name, created, revoked, hash FROM tokens ORDER BY id')
        : await this.rows<RawToken>(
            'SELECT id, owner, name, created, revoked, hash FROM tokens WHERE owner = $1 ORDER BY id',
            [owner],
          );
    return rows.map(toTokenRow);
  }

  async revokeToken(id: number): Promise<boolean> {
    return (
      (await this.changed('UPDATE tokens SET revoked = $1 WHERE id = $2 AND revoked IS NULL', [
        now(),
        id,
      ])) === 1
    );
  }

  async tokenRevoked(id: number): Promise<boolean> {
    const r = await this.one<{ revoked: string | null }>('SELECT revoked FROM tokens WHERE id = $1', [id]);
    return r === undefined || r.revoked !== null;
  }

  // --- files ---

  async getFile(owner: string, repoPath: string): Promise<FileRow | undefined> {
    return this.one<FileRow>('SELECT path, size, sha256, mtime FROM files WHERE owner = $1 AND path = $2', [
      owner,
      repoPath,
    ]);
  }

  async getStoredFile(owner: string, repoPath: string): Promise<StoredFile | undefined> {
    const r = await this.one<FileRow & { blob: string | null }>(
      'SELECT path, size, sha256, mtime, blob FROM files WHERE owner = $1 AND path = $2',
      [owner, repoPath],
    );
    if (!r) return undefined;
    const { blob, ...row } = r;
    return blob === null ? row : { ...row, blob };
  }

  async listFiles(owner: string, prefix = ''): Promise<FileRow[]> {
    const where = prefixClause(prefix, 2);
    return this.rows<FileRow>(
      `SELECT path, size, sha256, mtime FROM files WHERE owner = $1 AND ${where.sql} ORDER BY path`,
      [owner, ...where.params],
    );
  }

  async upsertFile(owner: string, f: FileRow, blob?: string): Promise<void> {
    await this.q.query(
      `INSERT INTO files (owner, path, size, sha256, mtime, blob) VALUES ($1, $2, $3, $4, $5, $6)
       ON CONFLICT (owner, path) DO UPDATE
         SET size = excluded.size, sha256 = excluded.sha256, mtime = excluded.mtime, blob = excluded.blob`,
      [owner, f.path, f.size, f.sha256, f.mtime, orNull(blob)],
    );
  }

  async deleteFile(owner: string, repoPath: string): Promise<boolean> {
    return (await this.changed('DELETE FROM files WHERE owner = $1 AND path = $2', [owner, repoPath])) === 1;
  }

  async renameFile(owner: string, from: string, to: string): Promise<void> {
    await this.q.query('UPDATE files SET path = $1, mtime = $2 WHERE owner = $3 AND path = $4', [
      to,
      now(),
      owner,
      from,
    ]);
  }

  async renameTree(owner: string, from: string, to: string): Promise<void> {
    for (const table of ['files', 'folders']) {
      await this.q.query(
        `UPDATE ${table} SET path = $1 || substr(path, length($2) + 1)
         WHERE owner = $3 AND (path = $2 OR starts_with(path, $2 || '/'))`,
        [to, from, owner],
      );
    }
  }

  // --- explicit folders ---

  async folderExists(owner: string, repoPath: string): Promise<boolean> {
    return (
      (await this.one('SELECT 1 FROM folders WHERE owner = $1 AND path = $2', [owner, repoPath])) !==
      undefined
    );
  }

  async insertFolder(owner: string, repoPath: string): Promise<boolean> {
    return (
      (await this.changed('INSERT INTO folders (owner, path) VALUES ($1, $2) ON CONFLICT DO NOTHING', [
        owner,
        repoPath,
      ])) === 1
    );
  }

  async deleteFolder(owner: string, repoPath: string): Promise<boolean> {
    return (
      (await this.changed('DELETE FROM folders WHERE owner = $1 AND path = $2', [owner, repoPath])) === 1
    );
  }

  async listFolders(owner: string, prefix = ''): Promise<string[]> {
    const where = prefixClause(prefix, 2);
    return (
      await this.rows<{ path: string }>(
        `SELECT path FROM folders WHERE owner = $1 AND ${where.sql} ORDER BY path`,
        [owner, ...where.params],
      )
    ).map((r) => r.path);
  }

  // --- SSH keys ---

  async insertKey(k: Omit<SshKeyRow, 'id' | 'created'> & { keyData: string }): Promise<number> {
    const r = await this.one<{ id: number }>(
      `INSERT INTO ssh_keys (owner, name, algorithm, key_data, fingerprint, created)
       VALUES ($1, $2, $3, $4, $5, $6) RETURNING id`,
      [k.owner, k.name, k.algorithm, k.keyData, k.fingerprint, now()],
    );
    return (r as { id: number }).id;
  }

  async findKey(owner: string, keyData: string): Promise<SshKeyRow | undefined> {
    return this.one<SshKeyRow>(
      `SELECT id, owner, name, algorithm, fingerprint, created FROM ssh_keys WHERE owner = $1 AND key_data = $2`,
      [owner, keyData],
    );
  }

  async keyExists(id: number): Promise<boolean> {
    return (await this.one('SELECT 1 FROM ssh_keys WHERE id = $1', [id])) !== undefined;
  }

  async listKeys(owner?: string): Promise<SshKeyRow[]> {
    const sql = 'SELECT id, owner, name, algorithm, fingerprint, created FROM ssh_keys';
    return owner === undefined
      ? this.rows<SshKeyRow>(`${sql} ORDER BY id`)
      : this.rows<SshKeyRow>(`${sql} WHERE owner = $1 ORDER BY id`, [owner]);
  }

  async deleteKey(owner: string, id: number): Promise<boolean> {
    return (await this.changed('DELETE FROM ssh_keys WHERE owner = $1 AND id = $2', [owner, id])) === 1;
  }

  // --- admin tokens ---

  async insertAdminToken(name: string, hash: string): Promise<number> {
    const r = await this.one<{ id: number }>(
      'INSERT INTO admin_tokens (name, hash, created) VALUES ($1, $2, $3) RETURNING id',
      [name, hash, now()],
    );
    return (r as { id: number }).id;
  }

  async findAdminTokenByHash(hash: string): Promise<(AdminTokenRow & { hash: string }) | undefined> {
    const r = await this.one<AdminTokenRow & { revoked: string | null; hash: string }>(
      'SELECT id, name, created, revoked, hash FROM admin_tokens WHERE hash = $1',
      [hash],
    );
    return r && { ...r, revoked: orUndef(r.revoked) };
  }

  async listAdminTokens(): Promise<AdminTokenRow[]> {
    return (
      await this.rows<AdminTokenRow & { revoked: string | null }>(
        'SELECT id, name, created, revoked FROM admin_tokens ORDER BY id',
      )
    ).map((r) => ({ ...r, revoked: orUndef(r.revoked) }));
  }

  async revokeAdminToken(id: number): Promise<boolean> {
    return (
      (await this.changed('UPDATE admin_tokens SET revoked = $1 WHERE id = $2 AND revoked IS NULL', [
        now(),
        id,
      ])) === 1
    );
  }

  // --- task capabilities ---

  async insertCapability(c: Omit<CapabilityRow, 'created' | 'revoked'>): Promise<void> {
    await this.q.query(
      `INSERT INTO capabilities (id, owner, task_id, results, expires, created, minted_by)
       VALUES ($1, $2, $3, $4, $5, $6, $7)`,
      [c.id, c.owner, c.taskId, c.results, c.expires, now(), c.mintedBy],
    );
  }

  async getCapability(id: string): Promise<CapabilityRow | undefined> {
    const r = await this.one<RawCapability>(`SELECT ${CAPABILITY_COLUMNS} FROM capabilities WHERE id = $1`, [
      id,
    ]);
    return r && toCapabilityRow(r);
  }

  async liveCapabilities(owner: string, nowSec: number): Promise<CapabilityRow[]> {
    return (
      await this.rows<RawCapability>(
        `SELECT ${CAPABILITY_COLUMNS} FROM capabilities
         WHERE owner = $1 AND expires > $2 AND revoked IS NULL ORDER BY created`,
        [owner, nowSec],
      )
    ).map(toCapabilityRow);
  }

  async latestCapability(owner: string, taskId: string): Promise<CapabilityRow | undefined> {
    const r = await this.one<RawCapability>(
      `SELECT ${CAPABILITY_COLUMNS} FROM capabilities WHERE task_id = $1 AND owner = $2
       ORDER BY created DESC LIMIT 1`,
      [taskId, owner],
    );
    return r && toCapabilityRow(r);
  }

  async revokeCapability(id: string): Promise<boolean> {
    return (
      (await this.changed('UPDATE capabilities SET revoked = $1 WHERE id = $2 AND revoked IS NULL', [
        now(),
        id,
      ])) === 1
    );
  }

  // --- base images ---

  async getBaseImage(name: string): Promise<BaseImageRow | undefined> {
    return this.one<BaseImageRow>('SELECT name, size, sha256, mtime FROM base_images WHERE name = $1', [
      name,
    ]);
  }

  async listBaseImages(): Promise<BaseImageRow[]> {
    return this.rows<BaseImageRow>('SELECT name, size, sha256, mtime FROM base_images ORDER BY name');
  }

  async insertBaseImage(row: BaseImageRow): Promise<boolean> {
    return (
      (await this.changed(
        'INSERT INTO base_images (name, size, sha256, mtime) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING',
        [row.name, row.size, row.sha256, row.mtime],
      )) === 1
    );
  }

  async deleteBaseImage(name: string): Promise<boolean> {
    return (await this.changed('DELETE FROM base_images WHERE name = $1', [name])) === 1;
  }

  // --- resumable upload sessions ---

  async insertUploadSession(r: UploadSessionRow): Promise<void> {
    await this.q.query(
      `INSERT INTO upload_sessions (id, owner, path, size, sha256, received, expires_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7)`,
      [r.id, r.owner, r.path, r.size, orNull(r.sha256), r.received, r.expiresAt],
    );
  }

  async updateUploadSession(id: string, received: number, expiresAt: number): Promise<void> {
    await this.q.query('UPDATE upload_sessions SET received = $1, expires_at = $2 WHERE id = $3', [
      received,
      expiresAt,
      id,
    ]);
  }

  async deleteUploadSession(id: string): Promise<void> {
    await this.q.query('DELETE FROM upload_sessions WHERE id = $1', [id]);
  }

  /** All sessions, or the one with `id`. */
  async listUploadSessions(id?: string): Promise<UploadSessionRow[]> {
    const rows = await this.rows<
      Omit<UploadSessionRow, 'sha256' | 'expiresAt'> & {
        sha256: string | null;
        expires_at: number;
      }
    >(
      `SELECT id, owner, path, size, sha256, received, expires_at FROM upload_sessions
       WHERE $1::text IS NULL OR id = $1`,
      [id ?? null],
    );
    return rows.map(({ sha256, expires_at, ...r }) => ({
      ...r,
      ...(sha256 !== null && { sha256 }),
      expiresAt: expires_at,
    }));
  }

  async getUploadSession(id: string): Promise<UploadSessionRow | undefined> {
    return (await this.listUploadSessions(id))[0];
  }

  /**
   * Records an append of `size` bytes (object `blob`) at `start`, if the session is still at `start`: the
   * one way a session moves on, so two servers appending at one offset cannot both succeed. False if
   * another append (or the session's end) came first.
   */
  async appendUploadPart(
    id: string,
    start: number,
    size: number,
    blob: string,
    expiresAt: number,
  ): Promise<boolean> {
    return inTransaction(this.pool, async (c) => {
      const moved = await c.query(
        'UPDATE upload_sessions SET received = $1, expires_at = $2 WHERE id = $3 AND received = $4',
        [start + size, expiresAt, id, start],
      );
      if (moved.rowCount !== 1) return false;
      await c.query('INSERT INTO upload_parts (upload_id, start, size, blob) VALUES ($1, $2, $3, $4)', [
        id,
        start,
        size,
        blob,
      ]);
      return true;
    });
  }

  async uploadParts(id: string): Promise<{ start: number; size: number; blob: string }[]> {
    return this.rows('SELECT start, size, blob FROM upload_parts WHERE upload_id = $1 ORDER BY start', [id]);
  }

  /** Ends a session (whoever gets here first); its parts' objects, for the caller to remove. */
  async claimUploadSession(id: string): Promise<string[] | undefined> {
    return inTransaction(this.pool, async (c) => {
      const parts = await c.query<{ blob: string }>('SELECT blob FROM upload_parts WHERE upload_id = $1', [
        id,
      ]);
      const gone = await c.query('DELETE FROM upload_sessions WHERE id = $1', [id]);
      return gone.rowCount === 1 ? parts.rows.map((r) => r.blob) : undefined;
    });
  }

  // --- image inspections ---

  async getImageInfo(sha256: string): Promise<ImageInfoRow | undefined> {
    const r = await this.one<RawImageInfo>(
      `SELECT sha256, status, format, virtual_bytes, actual_bytes, has_backing, error, inspected
       FROM image_info WHERE sha256 = $1`,
      [sha256],
    );
    return r && toImageInfoRow(r);
  }

  async putImageInfo(i: ImageInfoRow): Promise<void> {
    await this.q.query(
      `INSERT INTO image_info (sha256, status, format, virtual_bytes, actual_bytes, has_backing, error, inspected)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
       ON CONFLICT (sha256) DO UPDATE SET status = excluded.status, format = excluded.format,
         virtual_bytes = excluded.virtual_bytes, actual_bytes = excluded.actual_bytes,
         has_backing = excluded.has_backing, error = excluded.error, inspected = excluded.inspected`,
      [
        i.sha256,
        i.status,
        orNull(i.format),
        orNull(i.virtualBytes),
        orNull(i.actualBytes),
        orNull(i.hasBackingFile),
        orNull(i.error),
        i.inspected,
      ],
    );
  }
}
