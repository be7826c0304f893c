import { OWNER_NAME } from '../spec/repoPath';
import { generateToken, hashPassword, hashToken } from './auth';
import { MetadataDb, type OwnerRow, type OwnerUsage, type SshKeyRow, type TokenRow } from './metadataDb';
import { parsePublicKeyLine } from './sshKeys';

/**
 * Account administration for the `vsp` CLI. Each call opens the data dir's database directly (safe
 * next to a running server: SQLite WAL) and closes it again. Tokens are returned once, never stored.
 */

export type OwnerSummary = OwnerRow & { activeTokens: number; sshKeys: number; usage: OwnerUsage };
export type { SshKeyRow, TokenRow };

const MAX_TOKEN_NAME = 100;

function withDb<T>(dataDir: string, fn: (db: MetadataDb) => T): T {
  const db = MetadataDb.open(dataDir);
  try {
    return fn(db);
  } finally {
    db.close();
  }
}

function checkOwnerName(name: string): void {
  if (!OWNER_NAME.test(name))
    throw new Error(`owner name ${JSON.stringify(name)} is invalid: it must match ${OWNER_NAME}`);
}

function checkTokenName(name: string, what = 'token'): void {
  // eslint-disable-next-line no-control-regex
  if (name.length === 0 || name.length > MAX_TOKEN_NAME || /[\x00-\x1f\x7f]/.test(name)) {
    throw new Error(`${what} name ${JSON.stringify(name)} must be 1-${MAX_TOKEN_NAME} printable characters`);
  }
}

function requireOwner(db: MetadataDb, owner: string): void {
  if (!db.getOwner(owner)) throw new Error(`no such owner: ${owner}`);
}

/** Creates an owner with a first token named 'default'; fails if the owner exists. */
export function addOwner(dataDir: string, name: string): { owner: string; token: string } {
  checkOwnerName(name);
  return withDb(dataDir, (db) =>
    db.transaction(() => {
      if (!db.insertOwner(name)) throw new Error(`owner ${name} already exists`);
      const token = generateToken();
      db.insertToken(name, 'default', hashToken(token));
      return { owner: name, token };
    }),
  );
}

export function createToken(dataDir: string, owner: string, name: string): string {
  checkOwnerName(owner);
  checkTokenName(name);
  return withDb(dataDir, (db) => {
    requireOwner(db, owner);
    const token = generateToken();
    db.insertToken(owner, name, hashToken(token));
    return token;
  });
}

/** A token for host workers: it may read and write every owner's space. */
export function createServiceToken(dataDir: string, name: string): string {
  checkTokenName(name);
  return withDb(dataDir, (db) => {
    const token = generateToken();
    db.insertToken(undefined, name, hashToken(token));
    return token;
  });
}

export function listOwners(dataDir: string): OwnerSummary[] {
  return withDb(dataDir, (db) => db.listOwners().map((o) => ({ ...o, usage: db.usage(o.name) })));
}

/** All tokens (or one owner's), without their secrets; service tokens have no owner. */
export function listTokens(dataDir: string, owner?: string): TokenRow[] {
  if (owner !== undefined) checkOwnerName(owner);
  return withDb(dataDir, (db) => db.listTokens(owner));
}

export function revokeToken(dataDir: string, id: number): void {
  withDb(dataDir, (db) => {
    if (!db.revokeToken(id)) throw new Error(`no unrevoked token with id ${id}`);
  });
}

/** A disabled owner's tokens stop working and service tokens may no longer reach its space. */
export function setOwnerDisabled(dataDir: string, owner: string, disabled: boolean): void {
  checkOwnerName(owner);
  withDb(dataDir, (db) => {
    if (!db.setOwnerDisabled(owner, disabled)) throw new Error(`no such owner: ${owner}`);
  });
}

/** Sets (or replaces) an owner's password for SFTP/FTPS logins; sessions using the old one end. */
export async function setPassword(dataDir: string, owner: string, password: string): Promise<void> {
  checkOwnerName(owner);
  const hash = await hashPassword(password);
  withDb(dataDir, (db) => {
    if (!db.setPasswordHash(owner, hash)) throw new Error(`no such owner: ${owner}`);
  });
}

export function clearPassword(dataDir: string, owner: string): void {
  checkOwnerName(owner);
  withDb(dataDir, (db) => {
    if (!db.setPasswordHash(owner, undefined)) throw new Error(`no such owner: ${owner}`);
  });
}

/** Authorises an SSH public key (one `authorized_keys` line) for an owner's SFTP logins. */
export function addKey(dataDir: string, owner: string, publicKeyLine: string, name?: string): SshKeyRow {
  checkOwnerName(owner);
  const key = parsePublicKeyLine(publicKeyLine);
  const keyName = name ?? (key.comment || key.fingerprint);
  checkTokenName(keyName, 'key');
  return withDb(dataDir, (db) =>
    db.transaction(() => {
      requireOwner(db, owner);
      if (db.findKey(owner, key.keyData)) throw new Error(`${owner} already has key ${key.fingerprint}`);
      const id = db.insertKey({ owner, name: keyName, ...key });
      return db.listKeys(owner).find((k) => k.id === id) as SshKeyRow;
    }),
  );
}

/** Removes a key; sessions that logged in with it end at their next request. */
export function removeKey(dataDir: string, owner: string, id: number): void {
  checkOwnerName(owner);
  withDb(dataDir, (db) => {
    if (!db.deleteKey(owner, id)) throw new Error(`${owner} has no key with id ${id}`);
  });
}

export function listKeys(dataDir: string, owner?: string): SshKeyRow[] {
  if (owner !== undefined) checkOwnerName(owner);
  return withDb(dataDir, (db) => db.listKeys(owner));
}

/** Limits an owner's space; undefined means no limit. Files already stored are kept. */
export function setQuota(dataDir: string, owner: string, quota: { bytes?: number; files?: number }): void {
  checkOwnerName(owner);
  for (const [what, v] of Object.entries(quota)) {
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 0))
      throw new Error(`quota ${what} must be a whole number >= 0, not ${v}`);
  }
  withDb(dataDir, (db) => {
    if (!db.setQuota(owner, quota)) throw new Error(`no such owner: ${owner}`);
  });
}
