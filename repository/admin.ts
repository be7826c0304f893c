import { OWNER_NAME } from '../spec/repoPath';
import { generateToken, hashToken } from './auth';
import { MetadataDb, type OwnerRow, type TokenRow } from './metadataDb';

/**
 * Account administration for the `vsp` CLI. Each call opens the data dir's database directly (safe
 * next to a running server: SQLite WAL) and closes it again. Tokens are returned once, never stored.
 */

export type OwnerSummary = OwnerRow & { activeTokens: number };
export type { TokenRow };

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

function checkTokenName(name: string): void {
  // eslint-disable-next-line no-control-regex
  if (name.length === 0 || name.length > MAX_TOKEN_NAME || /[\x00-\x1f\x7f]/.test(name)) {
    throw new Error(`token name ${JSON.stringify(name)} must be 1-${MAX_TOKEN_NAME} printable characters`);
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
  return withDb(dataDir, (db) => db.listOwners());
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
