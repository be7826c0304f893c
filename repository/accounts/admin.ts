import { RefusedRequest } from '../refusedRequest';
import { OWNER_NAME } from '../../spec/repoPath';
import { generateToken, hashPassword, hashToken } from './auth';
import type { AdminTokenRow, OwnerRow, OwnerUsage, SshKeyRow, TokenRow } from '../store/metadataDb';
import type { MetadataStore } from '../store/metadataStore';
import { backendSettingsFromEnv, openMetadata } from '../store/backend';
import { parsePublicKeyLine } from './sshKeys';

/**
 * Account administration: one implementation (AccountAdmin, over an open database) behind both the
 * `vsp` admin CLI and the admin HTTP API. The CLI's functions below take the data dir, open its
 * database (safe next to a running server: SQLite WAL) and close it again. Tokens are returned once,
 * never stored. Disabling, revoking and removing take effect on every protocol at the next request,
 * since every protocol re-checks its credential then (auth.ts).
 */

export type OwnerSummary = OwnerRow & { activeTokens: number; sshKeys: number; usage: OwnerUsage };
export type { AdminTokenRow, SshKeyRow, TokenRow };

/** A refused account-administration request. */
export class AdminError extends RefusedRequest {}

const MAX_TOKEN_NAME = 100;

function checkOwnerName(name: string): void {
  if (typeof name !== 'string' || !OWNER_NAME.test(name))
    throw new AdminError(
      'invalid',
      `owner name ${JSON.stringify(name)} is invalid: it must match ${OWNER_NAME}`,
    );
}

// eslint-disable-next-line no-control-regex
const CONTROL_CHARACTER = /[\x00-\x1f\x7f]/;

function checkName(name: string, what: string): void {
  if (
    typeof name !== 'string' ||
    name.length === 0 ||
    name.length > MAX_TOKEN_NAME ||
    CONTROL_CHARACTER.test(name)
  ) {
    throw new AdminError(
      'invalid',
      `${what} name ${JSON.stringify(name)} must be 1-${MAX_TOKEN_NAME} printable characters`,
    );
  }
}

function checkQuota(quota: { bytes?: number; files?: number }): void {
  for (const [what, v] of Object.entries(quota)) {
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 0))
      throw new AdminError('invalid', `quota ${what} must be a whole number >= 0, not ${v}`);
  }
}

/** Turns a validation error of a helper (password rules, key parsing) into an AdminError. */
function invalid<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw new AdminError('invalid', (err as Error).message, { cause: err });
  }
}

export class AccountAdmin {
  constructor(private readonly db: MetadataStore) {}

  private async requireOwner(owner: string): Promise<void> {
    checkOwnerName(owner);
    if (!(await this.db.getOwner(owner))) throw new AdminError('not-found', `no such owner: ${owner}`);
  }

  /** Creates an owner with a first token named 'default'; fails if the owner exists. */
  async addOwner(name: string): Promise<{ owner: string; token: string }> {
    checkOwnerName(name);
    return await this.db.transaction(async (tx) => {
      if (!(await tx.insertOwner(name))) throw new AdminError('conflict', `owner ${name} already exists`);
      const token = generateToken();
      await tx.insertToken(name, 'default', hashToken(token));
      return { owner: name, token };
    });
  }

  async listOwners(): Promise<OwnerSummary[]> {
    const owners = await this.db.listOwners();
    return Promise.all(owners.map(async (o) => ({ ...o, usage: await this.db.usage(o.name) })));
  }

  /** A disabled owner's tokens and its tasks' capabilities stop working at their next request. */
  async setOwnerDisabled(owner: string, disabled: boolean): Promise<void> {
    checkOwnerName(owner);
    if (!(await this.db.setOwnerDisabled(owner, disabled)))
      throw new AdminError('not-found', `no such owner: ${owner}`);
  }

  /** Limits an owner's space; undefined means no limit. Files already stored are kept. */
  async setQuota(owner: string, quota: { bytes?: number; files?: number }): Promise<void> {
    checkOwnerName(owner);
    checkQuota(quota);
    if (!(await this.db.setQuota(owner, quota))) throw new AdminError('not-found', `no such owner: ${owner}`);
  }

  async createToken(owner: string, name: string): Promise<{ id: number; token: string }> {
    checkName(name, 'token');
    await this.requireOwner(owner);
    const token = generateToken();
    return { id: await this.db.insertToken(owner, name, hashToken(token)), token };
  }

  /** A token for host workers: it reads the provider's base images; owners' files need a task's capability. */
  async createServiceToken(name: string): Promise<{ id: number; token: string }> {
    checkName(name, 'token');
    const token = generateToken();
    return { id: await this.db.insertToken(undefined, name, hashToken(token)), token };
  }

  /** All tokens (or one owner's), without their secrets; service tokens have no owner. */
  async listTokens(owner?: string): Promise<TokenRow[]> {
    if (owner !== undefined) checkOwnerName(owner);
    return await this.db.listTokens(owner);
  }

  async revokeToken(id: number): Promise<void> {
    if (!(await this.db.revokeToken(id)))
      throw new AdminError('not-found', `no unrevoked token with id ${id}`);
  }

  /** Sets (or replaces) an owner's password for SFTP/FTPS logins; sessions using the old one end. */
  async setPassword(owner: string, password: string): Promise<void> {
    checkOwnerName(owner);
    let hash: string;
    try {
      hash = await hashPassword(password);
    } catch (err) {
      throw new AdminError('invalid', (err as Error).message, { cause: err });
    }
    if (!(await this.db.setPasswordHash(owner, hash)))
      throw new AdminError('not-found', `no such owner: ${owner}`);
  }

  async clearPassword(owner: string): Promise<void> {
    checkOwnerName(owner);
    if (!(await this.db.setPasswordHash(owner, undefined)))
      throw new AdminError('not-found', `no such owner: ${owner}`);
  }

  /** Authorises an SSH public key (one `authorized_keys` line) for an owner's SFTP logins. */
  async addKey(owner: string, publicKeyLine: string, name?: string): Promise<SshKeyRow> {
    checkOwnerName(owner);
    const key = invalid(() => parsePublicKeyLine(publicKeyLine));
    const keyName = name ?? (key.comment || key.fingerprint);
    checkName(keyName, 'key');
    return await this.db.transaction(async (tx) => {
      checkOwnerName(owner);
      if (!(await tx.getOwner(owner))) throw new AdminError('not-found', `no such owner: ${owner}`);
      if (await tx.findKey(owner, key.keyData))
        throw new AdminError('conflict', `${owner} already has key ${key.fingerprint}`);
      const id = await tx.insertKey({ owner, name: keyName, ...key });
      return (await tx.listKeys(owner)).find((k) => k.id === id) as SshKeyRow;
    });
  }

  /** Removes a key; sessions that logged in with it end at their next request. */
  async removeKey(owner: string, id: number): Promise<void> {
    checkOwnerName(owner);
    if (!(await this.db.deleteKey(owner, id)))
      throw new AdminError('not-found', `${owner} has no key with id ${id}`);
  }

  async listKeys(owner?: string): Promise<SshKeyRow[]> {
    if (owner !== undefined) checkOwnerName(owner);
    return await this.db.listKeys(owner);
  }

  /** A credential for the admin HTTP API, printed once. */
  async createAdminToken(name: string): Promise<{ id: number; token: string }> {
    checkName(name, 'admin token');
    const token = generateToken();
    return { id: await this.db.insertAdminToken(name, hashToken(token)), token };
  }

  async listAdminTokens(): Promise<AdminTokenRow[]> {
    return await this.db.listAdminTokens();
  }

  async revokeAdminToken(id: number): Promise<void> {
    if (!(await this.db.revokeAdminToken(id)))
      throw new AdminError('not-found', `no unrevoked admin token with id ${id}`);
  }
}

/**
 * Runs `fn` on the repository's metadata, opened for the call (the CLI's way in): the data dir's
 * database on `local`, PostgreSQL on `cluster` (the backend the VSP_REPOSITORY_* settings name).
 */
export async function withAdmin<T>(
  dataDir: string,
  fn: (admin: AccountAdmin, db: MetadataStore) => T | Promise<T>,
): Promise<T> {
  const db = await openMetadata(dataDir, backendSettingsFromEnv(process.env));
  try {
    return await fn(new AccountAdmin(db), db);
  } finally {
    await db.close();
  }
}

// The data-dir forms used by the CLI, tests and tools: each opens the database for one AccountAdmin call.

export const addOwner = (dataDir: string, name: string) => withAdmin(dataDir, (a) => a.addOwner(name));
export const createToken = async (dataDir: string, owner: string, name: string): Promise<string> =>
  (await withAdmin(dataDir, (a) => a.createToken(owner, name))).token;
export const createServiceToken = async (dataDir: string, name: string): Promise<string> =>
  (await withAdmin(dataDir, (a) => a.createServiceToken(name))).token;
export const listOwners = (dataDir: string) => withAdmin(dataDir, (a) => a.listOwners());
export const listTokens = (dataDir: string, owner?: string) => withAdmin(dataDir, (a) => a.listTokens(owner));
export const revokeToken = (dataDir: string, id: number) => withAdmin(dataDir, (a) => a.revokeToken(id));
export const setOwnerDisabled = (dataDir: string, owner: string, disabled: boolean) =>
  withAdmin(dataDir, (a) => a.setOwnerDisabled(owner, disabled));
export const setPassword = (dataDir: string, owner: string, password: string): Promise<void> =>
  withAdmin(dataDir, (a) => a.setPassword(owner, password));
export const clearPassword = (dataDir: string, owner: string) =>
  withAdmin(dataDir, (a) => a.clearPassword(owner));
export const addKey = (dataDir: string, owner: string, publicKeyLine: string, name?: string) =>
  withAdmin(dataDir, (a) => a.addKey(owner, publicKeyLine, name));
export const removeKey = (dataDir: string, owner: string, id: number) =>
  withAdmin(dataDir, (a) => a.removeKey(owner, id));
export const listKeys = (dataDir: string, owner?: string) => withAdmin(dataDir, (a) => a.listKeys(owner));
export const setQuota = (dataDir: string, owner: string, quota: { bytes?: number; files?: number }) =>
  withAdmin(dataDir, (a) => a.setQuota(owner, quota));
