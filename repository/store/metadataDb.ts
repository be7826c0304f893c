import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import type { StoredFile } from './metadataStore';

/**
 * The repository's metadata: owners, access tokens (hashed) and the files each owner holds. One
 * SQLite database per data dir, shared by the server process and the admin CLI (WAL lets both open
 * it at once). Every protocol (HTTP now, SFTP/FTPS later) goes through this module.
 */

export interface OwnerRow {
  name: string;
  created: string;
  disabled: boolean;
  hasPassword: boolean;
  /** Undefined: no limit. */
  quotaBytes?: number;
  quotaFiles?: number;
}

/** An SSH public key allowed to log in as its owner. */
export interface SshKeyRow {
  id: number;
  owner: string;
  name: string;
  /** e.g. 'ssh-ed25519'. */
  algorithm: string;
  /** SHA256:<base64> as OpenSSH prints it. */
  fingerprint: string;
  created: string;
}

export interface OwnerUsage {
  bytes: number;
  files: number;
}

export interface TokenRow {
  id: number;
  /** Undefined for a service token (the hosts': base images only). */
  owner?: string;
  name: string;
  created: string;
  revoked?: string;
}

export interface FileRow {
  path: string;
  size: number;
  sha256: string;
  /** ISO 8601, UTC. */
  mtime: string;
}

/** A base image the provider offers to every owner (read-only for them). */
export interface BaseImageRow {
  name: string;
  size: number;
  sha256: string;
  /** ISO 8601, UTC. */
  mtime: string;
}

/** What inspecting a file's content as a VM image found; keyed by content hash, so renames keep it. */
export interface ImageInfoRow {
  sha256: string;
  status: 'ok' | 'invalid';
  /** qemu-img's format name, when it could read the file at all. */
  format?: string;
  virtualBytes?: number;
  /** Bytes allocated on disk (qemu-img's actual-size). */
  actualBytes?: number;
  hasBackingFile?: boolean;
  /** Why the image is invalid. */
  error?: string;
  inspected: string;
}

/**
 * A resumable upload in progress. Its bytes are in a partial file named by `id`; `received` counts only
 * bytes already fsynced there, so after a crash the file is cut back to it.
 */
export interface UploadSessionRow {
  id: string;
  owner: string;
  path: string;
  size: number;
  sha256?: string;
  received: number;
  /** Milliseconds since the epoch. */
  expiresAt: number;
}

/** A credential for the admin HTTP API; kept apart from owner and service tokens so neither can pass for it. */
export interface AdminTokenRow {
  id: number;
  name: string;
  created: string;
  revoked?: string;
}

/** A task capability as minted (capabilities.ts): the signed token itself is never stored. */
export interface CapabilityRow {
  id: string;
  owner: string;
  taskId: string;
  /** The results folder it may write. */
  results: string;
  /** Unix seconds, as in the claims. */
  expires: number;
  created: string;
  /** Who minted it: `owner:<name>` through the task API, `admin:cli` through `vsp task grant`. */
  mintedBy: string;
  revoked?: string;
}

const SCHEMA_VERSION = 4;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS owners (
  name TEXT PRIMARY KEY,
  created TEXT NOT NULL,
  disabled INTEGER NOT NULL DEFAULT 0,
  password_hash TEXT,
  quota_bytes INTEGER,
  quota_files INTEGER
);
CREATE TABLE IF NOT EXISTS tokens (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  owner TEXT REFERENCES owners(name),
  service INTEGER NOT NULL CHECK (service IN (0, 1)),
  name TEXT NOT NULL,
  hash TEXT NOT NULL UNIQUE,
  created TEXT NOT NULL,
  revoked TEXT,
  CHECK ((service = 1 AND owner IS NULL) OR (service = 0 AND owner IS NOT NULL))
);
CREATE TABLE IF NOT EXISTS files (
  owner TEXT NOT NULL REFERENCES owners(name),
  path TEXT NOT NULL,
  size INTEGER NOT NULL,
  sha256 TEXT NOT NULL,
  mtime TEXT NOT NULL,
  PRIMARY KEY (owner, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ssh_keys (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  owner TEXT NOT NULL REFERENCES owners(name),
  name TEXT NOT NULL,
  algorithm TEXT NOT NULL,
  key_data TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  created TEXT NOT NULL,
  UNIQUE (owner, key_data)
);
CREATE TABLE IF NOT EXISTS folders (
  owner TEXT NOT NULL REFERENCES owners(name),
  path TEXT NOT NULL,
  PRIMARY KEY (owner, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS admin_tokens (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL,
  hash TEXT NOT NULL UNIQUE,
  created TEXT NOT NULL,
  revoked TEXT
);
CREATE TABLE IF NOT EXISTS base_images (
  name TEXT PRIMARY KEY,
  size INTEGER NOT NULL,
  sha256 TEXT NOT NULL,
  mtime TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS image_info (
  sha256 TEXT PRIMARY KEY,
  status TEXT NOT NULL CHECK (status IN ('ok', 'invalid')),
  format TEXT,
  virtual_bytes INTEGER,
  actual_bytes INTEGER,
  has_backing INTEGER,
  error TEXT,
  inspected TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS upload_sessions (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL REFERENCES owners(name),
  path TEXT NOT NULL,
  size INTEGER NOT NULL,
  sha256 TEXT,
  received INTEGER NOT NULL,
  expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS capabilities (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL REFERENCES owners(name),
  task_id TEXT NOT NULL,
  results TEXT NOT NULL,
  expires INTEGER NOT NULL,
  created TEXT NOT NULL,
  minted_by TEXT NOT NULL,
  revoked TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS capabilities_by_task ON capabilities (task_id);
CREATE INDEX IF NOT EXISTS capabilities_by_owner ON capabilities (owner, expires);
`;

/**
 * Schema 1 had owners without passwords or quotas; the new tables (SSH keys and folders in 2; admin
 * tokens, base images and image inspections in 3; task capabilities in 4) come from SCHEMA itself.
 */
const MIGRATE_FROM_1 = `
ALTER TABLE owners ADD COLUMN password_hash TEXT;
ALTER TABLE owners ADD COLUMN quota_bytes INTEGER;
ALTER TABLE owners ADD COLUMN quota_files INTEGER;
`;

export function repositoryDbPath(dataDir: string): string {
  return path.join(dataDir, 'repository.db');
}

export const OWNER_COLUMNS = 'name, created, disabled, password_hash, quota_bytes, quota_files';

/** An owner row as SQLite (0/1) or PostgreSQL (boolean) returns it. */
export interface RawOwner {
  name: string;
  created: string;
  disabled: number | boolean;
  password_hash: string | null;
  quota_bytes: number | null;
  quota_files: number | null;
}

export function toOwnerRow(r: RawOwner): OwnerRow {
  return {
    name: r.name,
    created: r.created,
    disabled: Boolean(r.disabled),
    hasPassword: r.password_hash !== null,
    quotaBytes: r.quota_bytes ?? undefined,
    quotaFiles: r.quota_files ?? undefined,
  };
}

export interface RawToken {
  id: number;
  owner: string | null;
  name: string;
  created: string;
  revoked: string | null;
  hash: string;
}

export function toTokenRow(r: RawToken): TokenRow {
  return {
    id: r.id,
    owner: r.owner ?? undefined,
    name: r.name,
    created: r.created,
    revoked: r.revoked ?? undefined,
  };
}

export class MetadataDb {
  private readonly db: Database.Database;

  private constructor(db: Database.Database) {
    this.db = db;
  }

  /** Opens (creating if needed) the database under `dataDir`. */
  static open(dataDir: string): MetadataDb {
    mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    const file = repositoryDbPath(dataDir);
    let db: Database.Database;
    try {
      db = new Database(file);
    } catch (err) {
      throw new Error(`cannot open repository database ${file}`, { cause: err });
    }
    db.pragma('journal_mode = WAL');
    db.pragma('busy_timeout = 5000');
    db.pragma('foreign_keys = ON');
    const version = db.pragma('user_version', { simple: true }) as number;
    if (version > SCHEMA_VERSION) {
      db.close();
      throw new Error(
        `repository database ${file} has schema ${version}, newer than this VSP (${SCHEMA_VERSION})`,
      );
    }
    db.transaction(() => {
      if (version === 1) db.exec(MIGRATE_FROM_1);
      db.exec(SCHEMA);
      db.pragma(`user_version = ${SCHEMA_VERSION}`);
    })();
    return new MetadataDb(db);
  }

  /** Opens the database (which migrates it) and closes it again; the versions before and after. */
  static migrate(dataDir: string): { from: number; to: number } {
    const file = repositoryDbPath(dataDir);
    let from = 0;
    if (existsSync(file)) {
      const peek = new Database(file, { readonly: true });
      try {
        from = peek.pragma('user_version', { simple: true }) as number;
      } finally {
        peek.close();
      }
    }
    MetadataDb.open(dataDir).close();
    return { from, to: SCHEMA_VERSION };
  }

  close(): void {
    this.db.close();
  }

  // --- owners ---

  getOwner(name: string): OwnerRow | undefined {
    const r = this.db.prepare(`SELECT ${OWNER_COLUMNS} FROM owners WHERE name = ?`).get(name) as
      RawOwner | undefined;
    return r && toOwnerRow(r);
  }

  listOwners(): (OwnerRow & { activeTokens: number; sshKeys: number })[] {
    const rows = this.db
      .prepare(
        `SELECT ${OWNER_COLUMNS},
           (SELECT COUNT(*) FROM tokens t WHERE t.owner = o.name AND t.revoked IS NULL) AS activeTokens,
           (SELECT COUNT(*) FROM ssh_keys k WHERE k.owner = o.name) AS sshKeys
         FROM owners o ORDER BY o.name`,
      )
      .all() as (RawOwner & { activeTokens: number; sshKeys: number })[];
    return rows.map((r) => ({ ...toOwnerRow(r), activeTokens: r.activeTokens, sshKeys: r.sshKeys }));
  }

  getPasswordHash(owner: string): string | undefined {
    const r = this.db.prepare('SELECT password_hash FROM owners WHERE name = ?').get(owner) as
      { password_hash: string | null } | undefined;
    return r?.password_hash ?? undefined;
  }

  /** `hash` undefined removes the password. Returns false if there is no such owner. */
  setPasswordHash(owner: string, hash: string | undefined): boolean {
    return (
      this.db.prepare('UPDATE owners SET password_hash = ? WHERE name = ?').run(hash ?? null, owner)
        .changes === 1
    );
  }

  /** Undefined limits mean none. Returns false if there is no such owner. */
  setQuota(owner: string, quota: { bytes?: number; files?: number }): boolean {
    return (
      this.db
        .prepare('UPDATE owners SET quota_bytes = ?, quota_files = ? WHERE name = ?')
        .run(quota.bytes ?? null, quota.files ?? null, owner).changes === 1
    );
  }

  usage(owner: string): OwnerUsage {
    return this.db
      .prepare('SELECT COALESCE(SUM(size), 0) AS bytes, COUNT(*) AS files FROM files WHERE owner = ?')
      .get(owner) as OwnerUsage;
  }

  /** Inserts an owner; returns false if one of that name already exists. */
  insertOwner(name: string): boolean {
    const info = this.db
      .prepare('INSERT INTO owners (name, created) VALUES (?, ?) ON CONFLICT (name) DO NOTHING')
      .run(name, new Date().toISOString());
    return info.changes === 1;
  }

  /** Returns false if there is no such owner. */
  setOwnerDisabled(name: string, disabled: boolean): boolean {
    return (
      this.db.prepare('UPDATE owners SET disabled = ? WHERE name = ?').run(disabled ? 1 : 0, name).changes ===
      1
    );
  }

  /** Runs `fn` in one transaction (an owner and its first token appear together or not at all). */
  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn)();
  }

  /** For metadataStore.ts's asynchronous transactions, which cannot run inside `transaction`. */
  begin(): void {
    this.db.exec('BEGIN IMMEDIATE');
  }

  commit(): void {
    this.db.exec('COMMIT');
  }

  rollback(): void {
    if (this.db.inTransaction) this.db.exec('ROLLBACK');
  }

  /** The owner; SQLite's single writer already orders the transactions that read it (see PgMetadata). */
  lockOwner(name: string): OwnerRow | undefined {
    return this.getOwner(name);
  }

  // --- tokens ---

  /** `owner` undefined makes a service token. */
  insertToken(owner: string | undefined, name: string, hash: string): number {
    const info = this.db
      .prepare('INSERT INTO tokens (owner, service, name, hash, created) VALUES (?, ?, ?, ?, ?)')
      .run(owner ?? null, owner === undefined ? 1 : 0, name, hash, new Date().toISOString());
    return Number(info.lastInsertRowid);
  }

  /** The token with this hash, with its hash for a constant-time re-check. */
  findTokenByHash(hash: string): (TokenRow & { hash: string }) | undefined {
    const r = this.db
      .prepare('SELECT id, owner, name, created, revoked, hash FROM tokens WHERE hash = ?')
      .get(hash) as RawToken | undefined;
    return r && { ...toTokenRow(r), hash: r.hash };
  }

  listTokens(owner?: string): TokenRow[] {
    const rows = (
      owner === undefined
        ? this.db.prepare('SELECT id, owner, name, created, revoked, hash FROM tokens ORDER BY id').all()
        : this.db
            .prepare('SELECT id, owner, name, created, revoked, hash FROM tokens WHERE owner = ? ORDER BY id')
            .all(owner)
    ) as RawToken[];
    return rows.map(toTokenRow);
  }

  /** Returns false if there is no such unrevoked token. */
  revokeToken(id: number): boolean {
    return (
      this.db
        .prepare('UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL')
        .run(new Date().toISOString(), id).changes === 1
    );
  }

  // --- files ---

  getFile(owner: string, repoPath: string): FileRow | undefined {
    return this.db
      .prepare('SELECT path, size, sha256, mtime FROM files WHERE owner = ? AND path = ?')
      .get(owner, repoPath) as FileRow | undefined;
  }

  /** Files whose path starts with `prefix` (a plain string prefix, not only whole folders), by path. */
  listFiles(owner: string, prefix = ''): FileRow[] {
    return this.db
      .prepare(
        `SELECT path, size, sha256, mtime FROM files
         WHERE owner = ? AND substr(path, 1, length(?)) = ? ORDER BY path`,
      )
      .all(owner, prefix, prefix) as FileRow[];
  }

  /** The file's row; on `local` its bytes are at its path, so there is no object key. */
  getStoredFile(owner: string, repoPath: string): StoredFile | undefined {
    return this.getFile(owner, repoPath);
  }

  /** `_blob` is the `cluster` backend's object key; on `local` the bytes are at the path. */
  upsertFile(owner: string, f: FileRow, _blob?: string): void {
    this.db
      .prepare(
        `INSERT INTO files (owner, path, size, sha256, mtime) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (owner, path) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256, mtime = excluded.mtime`,
      )
      .run(owner, f.path, f.size, f.sha256, f.mtime);
  }

  /** Returns false if there was no such file. */
  deleteFile(owner: string, repoPath: string): boolean {
    return (
      this.db.prepare('DELETE FROM files WHERE owner = ? AND path = ?').run(owner, repoPath).changes === 1
    );
  }

  /** Moves one file's record; the caller has checked that `to` is free. */
  renameFile(owner: string, from: string, to: string): void {
    this.db
      .prepare('UPDATE files SET path = ?, mtime = ? WHERE owner = ? AND path = ?')
      .run(to, new Date().toISOString(), owner, from);
  }

  /** Moves every file and folder record under `from/` to `to/` (a folder rename). */
  renameTree(owner: string, from: string, to: string): void {
    for (const table of ['files', 'folders']) {
      this.db
        .prepare(
          `UPDATE ${table} SET path = ? || substr(path, length(?) + 1)
           WHERE owner = ? AND (path = ? OR substr(path, 1, length(?) + 1) = ? || '/')`,
        )
        .run(to, from, owner, from, from, from);
    }
  }

  // --- empty folders made explicitly (over SFTP/FTP); folders holding files are implied by their paths ---

  folderExists(owner: string, repoPath: string): boolean {
    return (
      this.db.prepare('SELECT 1 FROM folders WHERE owner = ? AND path = ?').get(owner, repoPath) !== undefined
    );
  }

  insertFolder(owner: string, repoPath: string): boolean {
    return (
      this.db
        .prepare('INSERT INTO folders (owner, path) VALUES (?, ?) ON CONFLICT DO NOTHING')
        .run(owner, repoPath).changes === 1
    );
  }

  deleteFolder(owner: string, repoPath: string): boolean {
    return (
      this.db.prepare('DELETE FROM folders WHERE owner = ? AND path = ?').run(owner, repoPath).changes === 1
    );
  }

  /** Explicit folders whose path starts with `prefix`, by path. */
  listFolders(owner: string, prefix = ''): string[] {
    return (
      this.db
        .prepare(`SELECT path FROM folders WHERE owner = ? AND substr(path, 1, length(?)) = ? ORDER BY path`)
        .all(owner, prefix, prefix) as { path: string }[]
    ).map((r) => r.path);
  }

  // --- SSH keys ---

  insertKey(k: Omit<SshKeyRow, 'id' | 'created'> & { keyData: string }): number {
    const info = this.db
      .prepare(
        `INSERT INTO ssh_keys (owner, name, algorithm, key_data, fingerprint, created)
         VALUES (?, ?, ?, ?, ?, ?)`,
      )
      .run(k.owner, k.name, k.algorithm, k.keyData, k.fingerprint, new Date().toISOString());
    return Number(info.lastInsertRowid);
  }

  /** This owner's key with this base64 public blob (the blob names its own algorithm). */
  findKey(owner: string, keyData: string): SshKeyRow | undefined {
    return this.db
      .prepare(
        `SELECT id, owner, name, algorithm, fingerprint, created FROM ssh_keys
         WHERE owner = ? AND key_data = ?`,
      )
      .get(owner, keyData) as SshKeyRow | undefined;
  }

  keyExists(id: number): boolean {
    return this.db.prepare('SELECT 1 FROM ssh_keys WHERE id = ?').get(id) !== undefined;
  }

  listKeys(owner?: string): SshKeyRow[] {
    const sql = `SELECT id, owner, name, algorithm, fingerprint, created FROM ssh_keys`;
    return (
      owner === undefined
        ? this.db.prepare(`${sql} ORDER BY id`).all()
        : this.db.prepare(`${sql} WHERE owner = ? ORDER BY id`).all(owner)
    ) as SshKeyRow[];
  }

  /** Returns false if the owner has no key with this id. */
  deleteKey(owner: string, id: number): boolean {
    return this.db.prepare('DELETE FROM ssh_keys WHERE owner = ? AND id = ?').run(owner, id).changes === 1;
  }

  tokenRevoked(id: number): boolean {
    const r = this.db.prepare('SELECT revoked FROM tokens WHERE id = ?').get(id) as
      { revoked: string | null } | undefined;
    return r === undefined || r.revoked !== null;
  }

  // --- admin tokens ---

  insertAdminToken(name: string, hash: string): number {
    const info = this.db
      .prepare('INSERT INTO admin_tokens (name, hash, created) VALUES (?, ?, ?)')
      .run(name, hash, new Date().toISOString());
    return Number(info.lastInsertRowid);
  }

  findAdminTokenByHash(hash: string): (AdminTokenRow & { hash: string }) | undefined {
    const r = this.db
      .prepare('SELECT id, name, created, revoked, hash FROM admin_tokens WHERE hash = ?')
      .get(hash) as (AdminTokenRow & { revoked: string | null; hash: string }) | undefined;
    return r && { ...r, revoked: r.revoked ?? undefined };
  }

  listAdminTokens(): AdminTokenRow[] {
    return (
      this.db.prepare('SELECT id, name, created, revoked FROM admin_tokens ORDER BY id').all() as (Omit<
        AdminTokenRow,
        'revoked'
      > & { revoked: string | null })[]
    ).map((r) => ({ ...r, revoked: r.revoked ?? undefined }));
  }

  /** Returns false if there is no such unrevoked admin token. */
  revokeAdminToken(id: number): boolean {
    return (
      this.db
        .prepare('UPDATE admin_tokens SET revoked = ? WHERE id = ? AND revoked IS NULL')
        .run(new Date().toISOString(), id).changes === 1
    );
  }

  // --- task capabilities ---

  insertCapability(c: Omit<CapabilityRow, 'created' | 'revoked'>): void {
    this.db
      .prepare(
        `INSERT INTO capabilities (id, owner, task_id, results, expires, created, minted_by)
         VALUES (?, ?, ?, ?, ?, ?, ?)`,
      )
      .run(c.id, c.owner, c.taskId, c.results, c.expires, new Date().toISOString(), c.mintedBy);
  }

  getCapability(id: string): CapabilityRow | undefined {
    const r = this.db.prepare(`SELECT ${CAPABILITY_COLUMNS} FROM capabilities WHERE id = ?`).get(id) as
      RawCapability | undefined;
    return r && toCapabilityRow(r);
  }

  /** The owner's capabilities neither revoked nor expired at `nowSec`: tasks that may still write results. */
  liveCapabilities(owner: string, nowSec: number): CapabilityRow[] {
    return (
      this.db
        .prepare(
          `SELECT ${CAPABILITY_COLUMNS} FROM capabilities
           WHERE owner = ? AND expires > ? AND revoked IS NULL ORDER BY created`,
        )
        .all(owner, nowSec) as RawCapability[]
    ).map(toCapabilityRow);
  }

  /** The newest capability minted for the owner's task id: its latest run's. */
  latestCapability(owner: string, taskId: string): CapabilityRow | undefined {
    const r = this.db
      .prepare(
        `SELECT ${CAPABILITY_COLUMNS} FROM capabilities
         WHERE task_id = ? AND owner = ? ORDER BY created DESC LIMIT 1`,
      )
      .get(taskId, owner) as RawCapability | undefined;
    return r && toCapabilityRow(r);
  }

  /** Returns false if there is no such unrevoked capability. */
  revokeCapability(id: string): boolean {
    return (
      this.db
        .prepare('UPDATE capabilities SET revoked = ? WHERE id = ? AND revoked IS NULL')
        .run(new Date().toISOString(), id).changes === 1
    );
  }

  // --- the provider's base images ---

  getBaseImage(name: string): BaseImageRow | undefined {
    return this.db.prepare('SELECT name, size, sha256, mtime FROM base_images WHERE name = ?').get(name) as
      BaseImageRow | undefined;
  }

  listBaseImages(): BaseImageRow[] {
    return this.db
      .prepare('SELECT name, size, sha256, mtime FROM base_images ORDER BY name')
      .all() as BaseImageRow[];
  }

  /** Returns false if a base image of that name already exists. */
  insertBaseImage(row: BaseImageRow): boolean {
    return (
      this.db
        .prepare(
          'INSERT INTO base_images (name, size, sha256, mtime) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING',
        )
        .run(row.name, row.size, row.sha256, row.mtime).changes === 1
    );
  }

  deleteBaseImage(name: string): boolean {
    return this.db.prepare('DELETE FROM base_images WHERE name = ?').run(name).changes === 1;
  }

  // --- resumable upload sessions (a table added without a schema bump: SCHEMA creates it if missing) ---

  insertUploadSession(r: UploadSessionRow): void {
    this.db
      .prepare(
        `INSERT INTO upload_sessions (id, owner, path, size, sha256, received, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)`,
      )
      .run(r.id, r.owner, r.path, r.size, r.sha256 ?? null, r.received, r.expiresAt);
  }

  updateUploadSession(id: string, received: number, expiresAt: number): void {
    this.db
      .prepare('UPDATE upload_sessions SET received = ?, expires_at = ? WHERE id = ?')
      .run(received, expiresAt, id);
  }

  deleteUploadSession(id: string): void {
    this.db.prepare('DELETE FROM upload_sessions WHERE id = ?').run(id);
  }

  listUploadSessions(): UploadSessionRow[] {
    const rows = this.db
      .prepare('SELECT id, owner, path, size, sha256, received, expires_at FROM upload_sessions')
      .all() as (Omit<UploadSessionRow, 'sha256' | 'expiresAt'> & {
      sha256: string | null;
      expires_at: number;
    })[];
    return rows.map(({ sha256, expires_at, ...r }) => ({
      ...r,
      ...(sha256 !== null && { sha256 }),
      expiresAt: expires_at,
    }));
  }

  // --- image inspections ---

  getImageInfo(sha256: string): ImageInfoRow | undefined {
    const r = this.db
      .prepare(
        `SELECT sha256, status, format, virtual_bytes, actual_bytes, has_backing, error, inspected
         FROM image_info WHERE sha256 = ?`,
      )
      .get(sha256) as RawImageInfo | undefined;
    return r && toImageInfoRow(r);
  }

  putImageInfo(i: ImageInfoRow): void {
    this.db
      .prepare(
        `INSERT OR REPLACE INTO image_info
           (sha256, status, format, virtual_bytes, actual_bytes, has_backing, error, inspected)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
      )
      .run(
        i.sha256,
        i.status,
        i.format ?? null,
        i.virtualBytes ?? null,
        i.actualBytes ?? null,
        i.hasBackingFile === undefined ? null : i.hasBackingFile ? 1 : 0,
        i.error ?? null,
        i.inspected,
      );
  }
}

export interface RawImageInfo {
  sha256: string;
  status: 'ok' | 'invalid';
  format: string | null;
  virtual_bytes: number | null;
  actual_bytes: number | null;
  has_backing: number | boolean | null;
  error: string | null;
  inspected: string;
}

export function toImageInfoRow(r: RawImageInfo): ImageInfoRow {
  return {
    sha256: r.sha256,
    status: r.status,
    format: r.format ?? undefined,
    virtualBytes: r.virtual_bytes ?? undefined,
    actualBytes: r.actual_bytes ?? undefined,
    hasBackingFile: r.has_backing === null ? undefined : Boolean(r.has_backing),
    error: r.error ?? undefined,
    inspected: r.inspected,
  };
}

export const CAPABILITY_COLUMNS = 'id, owner, task_id, results, expires, created, minted_by, revoked';

export interface RawCapability {
  id: string;
  owner: string;
  task_id: string;
  results: string;
  expires: number;
  created: string;
  minted_by: string;
  revoked: string | null;
}

export function toCapabilityRow(r: RawCapability): CapabilityRow {
  return {
    id: r.id,
    owner: r.owner,
    taskId: r.task_id,
    results: r.results,
    expires: r.expires,
    created: r.created,
    mintedBy: r.minted_by,
    revoked: r.revoked ?? undefined,
  };
}
