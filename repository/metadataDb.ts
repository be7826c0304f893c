import { mkdirSync } from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';

/**
 * The repository's metadata: owners, access tokens (hashed) and the files each owner holds. One
 * SQLite database per data dir, shared by the server process and the admin CLI (WAL lets both open
 * it at once). Every protocol (HTTP now, SFTP/FTPS later) goes through this module.
 */

export interface OwnerRow {
  name: string;
  created: string;
  disabled: boolean;
}

export interface TokenRow {
  id: number;
  /** Undefined for a service token, which may act for any owner. */
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

const SCHEMA_VERSION = 1;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS owners (
  name TEXT PRIMARY KEY,
  created TEXT NOT NULL,
  disabled INTEGER NOT NULL DEFAULT 0
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
`;

export function repositoryDbPath(dataDir: string): string {
  return path.join(dataDir, 'repository.db');
}

interface RawToken {
  id: number;
  owner: string | null;
  name: string;
  created: string;
  revoked: string | null;
  hash: string;
}

function toTokenRow(r: RawToken): TokenRow {
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
    db.exec(SCHEMA);
    db.pragma(`user_version = ${SCHEMA_VERSION}`);
    return new MetadataDb(db);
  }

  close(): void {
    this.db.close();
  }

  // --- owners ---

  getOwner(name: string): OwnerRow | undefined {
    const r = this.db.prepare('SELECT name, created, disabled FROM owners WHERE name = ?').get(name) as
      { name: string; created: string; disabled: number } | undefined;
    return r && { name: r.name, created: r.created, disabled: r.disabled !== 0 };
  }

  listOwners(): (OwnerRow & { activeTokens: number })[] {
    const rows = this.db
      .prepare(
        `SELECT o.name, o.created, o.disabled,
           (SELECT COUNT(*) FROM tokens t WHERE t.owner = o.name AND t.revoked IS NULL) AS activeTokens
         FROM owners o ORDER BY o.name`,
      )
      .all() as { name: string; created: string; disabled: number; activeTokens: number }[];
    return rows.map((r) => ({ ...r, disabled: r.disabled !== 0 }));
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

  upsertFile(owner: string, f: FileRow): void {
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
}
