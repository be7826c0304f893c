import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { hash as argon2Hash, verify as argon2Verify } from '@node-rs/argon2';
import { OWNER_NAME } from '../../spec/repoPath';
import { CAPABILITY_PREFIX, type CapabilityClaims } from '../../spec/capability';
import { BASE_IMAGES_FOLDER } from '../../spec/taskSpec';
import { isUnder, verifyCapability, type CapabilityKeys } from './capabilities';
import type { MetadataStore } from '../store/metadataStore';

/**
 * Access tokens and who may touch which owner's space. Protocol-neutral: HTTP passes a bearer
 * token, SFTP/FTPS will pass a password, both end up in `authenticate` and `authorise`.
 */

export const TOKEN_PREFIX = 'vsp_';
/** Tokens supplied from outside (a service token in the environment) must carry some entropy. */
export const MIN_SUPPLIED_TOKEN_LENGTH = 16;

/**
 * Who a valid credential speaks for: an owner (its API token), the hosts (a service token: the provider's
 * base images only), or one task (its capability: that task's inputs, image and results only).
 */
export type Principal =
  | { kind: 'owner'; owner: string; tokenId: number }
  | { kind: 'service'; tokenId: number }
  | { kind: 'capability'; owner: string; claims: CapabilityClaims };

/** What a request does in an owner's space, for `authorise`. */
export type Access =
  /** Download or stat one file. */
  | { op: 'read'; path: string }
  /** Upload (whole or resumable) or delete one file. */
  | { op: 'write'; path: string }
  /** List files whose path starts with `prefix`. */
  | { op: 'list'; prefix: string }
  /** The owner's account-wide views and actions: tasks, images. */
  | { op: 'account' };

/** A refusal with the status a protocol should map it to (401: who are you; 403: not yours; 404). */
export class AccessDenied extends Error {
  constructor(
    readonly status: 401 | 403 | 404,
    message: string,
  ) {
    super(message);
    this.name = 'AccessDenied';
  }
}

export function generateToken(): string {
  return TOKEN_PREFIX + randomBytes(32).toString('base64url');
}

/** Tokens are high-entropy, so a plain SHA-256 is enough; only the hash is ever stored. */
export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

/**
 * Resolves a presented token (an API token, or with `keys` a task capability) to its principal, or
 * throws AccessDenied(401).
 */
export async function authenticate(
  db: MetadataStore,
  token: string | undefined,
  keys?: CapabilityKeys,
): Promise<Principal> {
  if (token === undefined || token.length === 0) throw new AccessDenied(401, 'missing access token');
  if (token.startsWith(CAPABILITY_PREFIX)) {
    if (!keys) throw new AccessDenied(401, 'a task capability is not accepted here');
    const claims = await verifyCapability(db, keys, token);
    return { kind: 'capability', owner: claims.owner, claims };
  }
  const hash = hashToken(token);
  const row = await db.findTokenByHash(hash);
  // The lookup is by hash already; the constant-time re-check keeps the comparison itself timing-safe.
  if (!row || !timingSafeEqual(Buffer.from(row.hash, 'hex'), Buffer.from(hash, 'hex'))) {
    throw new AccessDenied(401, 'invalid access token');
  }
  if (row.revoked !== undefined) throw new AccessDenied(401, 'access token has been revoked');
  if (row.owner === undefined) return { kind: 'service', tokenId: row.id };
  const owner = await db.getOwner(row.owner);
  if (!owner || owner.disabled) throw new AccessDenied(401, `owner ${row.owner} is disabled`);
  return { kind: 'owner', owner: row.owner, tokenId: row.id };
}

/**
 * May `principal` do `access` in `owner`'s space? Owner tokens reach only their own space (and learn
 * nothing about others, not even whether they exist). A capability reaches its task's input paths and
 * image (read) and its results folder (read, write, list), nothing else. Service tokens (the hosts')
 * read the provider's base images only: a task's files need that task's capability.
 */
export async function authorise(
  db: MetadataStore,
  principal: Principal,
  owner: string,
  access: Access,
): Promise<void> {
  if (principal.kind === 'owner') {
    if (principal.owner !== owner) throw new AccessDenied(403, `this token may not access owner ${owner}`);
    return;
  }
  if (principal.kind === 'capability') {
    const c = principal.claims;
    if (c.owner !== owner)
      throw new AccessDenied(403, `task ${c.taskId}'s capability may not access owner ${owner}`);
    if (!capabilityAllows(c, access))
      throw new AccessDenied(403, `task ${c.taskId}'s capability does not allow ${describeAccess(access)}`);
    return;
  }
  if (access.op !== 'read' || !isUnder(access.path, BASE_IMAGES_FOLDER) || access.path === BASE_IMAGES_FOLDER)
    throw new AccessDenied(
      403,
      `a service token reads only ${BASE_IMAGES_FOLDER}/; ${describeAccess(access)} needs the task's capability`,
    );
  const row = await db.getOwner(owner);
  if (!row) throw new AccessDenied(404, `no such owner: ${owner}`);
  if (row.disabled) throw new AccessDenied(403, `owner ${owner} is disabled`);
}

function capabilityAllows(c: CapabilityClaims, access: Access): boolean {
  switch (access.op) {
    case 'read':
      return isUnder(access.path, c.results) || c.read.includes(access.path) || c.image === access.path;
    case 'write':
      return isUnder(access.path, c.results) && access.path !== c.results;
    case 'list':
      // A plain string prefix: `results/t1` would also list `results/t10/`.
      return access.prefix.startsWith(`${c.results}/`);
    case 'account':
      return false;
  }
}

function describeAccess(access: Access): string {
  switch (access.op) {
    case 'read':
      return `reading ${access.path}`;
    case 'write':
      return `writing ${access.path}`;
    case 'list':
      return `listing ${access.prefix === '' ? 'the whole space' : `${access.prefix}*`}`;
    case 'account':
      return "the owner's tasks and images";
  }
}

export const MIN_PASSWORD_LENGTH = 10;
export const MAX_PASSWORD_LENGTH = 1024;

/** Argon2id with the library's defaults (OWASP's minimum: 19 MiB, 2 passes). */
export async function hashPassword(password: string): Promise<string> {
  if (password.length < MIN_PASSWORD_LENGTH || password.length > MAX_PASSWORD_LENGTH) {
    throw new Error(`a password must be ${MIN_PASSWORD_LENGTH}-${MAX_PASSWORD_LENGTH} characters long`);
  }
  if (password.startsWith(TOKEN_PREFIX)) throw new Error(`a password may not start with '${TOKEN_PREFIX}'`);
  return argon2Hash(password);
}

/** Verified against for unknown owners too, so a login's timing does not tell which owners exist. */
let dummyHash: Promise<string> | undefined;

/** How an owner logged in on a session protocol (SFTP, FTPS); re-checked on every request. */
export type Credential =
  | { kind: 'password'; /** the hash logged in against */ hash: string }
  | { kind: 'token'; id: number }
  | { kind: 'key'; id: number };

export interface OwnerSession {
  owner: string;
  credential: Credential;
}

/**
 * A login by name and secret: the secret is the owner's password, or one of its API tokens (so
 * tools that only know passwords can use a revocable token). Throws AccessDenied(401).
 */
export async function authenticatePassword(
  db: MetadataStore,
  owner: string,
  secret: string,
): Promise<OwnerSession> {
  if (secret.startsWith(TOKEN_PREFIX)) {
    const p = await authenticate(db, secret);
    if (p.kind !== 'owner' || p.owner !== owner)
      throw new AccessDenied(401, `token is not one of ${owner}'s`);
    return { owner, credential: { kind: 'token', id: p.tokenId } };
  }
  const row = OWNER_NAME.test(owner) ? await db.getOwner(owner) : undefined;
  const stored = row ? await db.getPasswordHash(owner) : undefined;
  const ok =
    secret.length <= MAX_PASSWORD_LENGTH &&
    (await argon2Verify(
      stored ?? (await (dummyHash ??= argon2Hash(randomBytes(16).toString('hex')))),
      secret,
    ));
  if (!row || stored === undefined || !ok) throw new AccessDenied(401, `wrong name or password for ${owner}`);
  if (row.disabled) throw new AccessDenied(401, `owner ${owner} is disabled`);
  return { owner, credential: { kind: 'password', hash: stored } };
}

/** A login by SSH key, once the protocol has checked the signature. Throws AccessDenied(401). */
export async function authenticateKey(
  db: MetadataStore,
  owner: string,
  keyBlob: Buffer,
): Promise<OwnerSession> {
  const row = OWNER_NAME.test(owner) ? await db.getOwner(owner) : undefined;
  const key = row && (await db.findKey(owner, keyBlob.toString('base64')));
  if (!row || !key) throw new AccessDenied(401, `key is not authorised for ${owner}`);
  if (row.disabled) throw new AccessDenied(401, `owner ${owner} is disabled`);
  return { owner, credential: { kind: 'key', id: key.id } };
}

/**
 * Is a session still allowed? Disabling the owner, revoking the token, removing the key or changing
 * the password ends its sessions at their next request.
 */
export async function checkSession(db: MetadataStore, s: OwnerSession): Promise<void> {
  const row = await db.getOwner(s.owner);
  if (!row || row.disabled) throw new AccessDenied(401, `owner ${s.owner} is disabled`);
  const c = s.credential;
  if (c.kind === 'token' && (await db.tokenRevoked(c.id)))
    throw new AccessDenied(401, 'access token has been revoked');
  if (c.kind === 'key' && !(await db.keyExists(c.id)))
    throw new AccessDenied(401, 'SSH key has been removed');
  if (c.kind === 'password' && (await db.getPasswordHash(s.owner)) !== c.hash) {
    throw new AccessDenied(401, 'password has been changed');
  }
}

/** Records a supplied service token under `name` unless a token with its hash already exists. */
export async function ensureServiceToken(db: MetadataStore, token: string, name: string): Promise<void> {
  if (token.length < MIN_SUPPLIED_TOKEN_LENGTH) {
    throw new Error(`service token is too short: at least ${MIN_SUPPLIED_TOKEN_LENGTH} characters required`);
  }
  const existing = await db.findTokenByHash(hashToken(token));
  if (existing) {
    if (existing.owner !== undefined) throw new Error('the supplied service token is already an owner token');
    if (existing.revoked !== undefined) throw new Error('the supplied service token has been revoked');
    return;
  }
  await db.insertToken(undefined, name, hashToken(token));
}

/** An admin API caller: one of the admin tokens made by `vsp admin token create`. */
export interface AdminPrincipal {
  kind: 'admin';
  tokenId: number;
}

/** How a principal appears in the audit log's `user`: never a secret. */
export function principalLabel(p: Principal | AdminPrincipal): string {
  switch (p.kind) {
    case 'owner':
      return p.owner;
    case 'service':
      return `service:${p.tokenId}`;
    case 'capability':
      return `capability:${p.claims.id}`;
    case 'admin':
      return `admin:${p.tokenId}`;
  }
}

async function findAdmin(db: MetadataStore, token: string): Promise<AdminPrincipal | undefined> {
  const hash = hashToken(token);
  const row = await db.findAdminTokenByHash(hash);
  if (!row || !timingSafeEqual(Buffer.from(row.hash, 'hex'), Buffer.from(hash, 'hex'))) return undefined;
  if (row.revoked !== undefined) throw new AccessDenied(401, 'admin token has been revoked');
  return { kind: 'admin', tokenId: row.id };
}

/** Any credential's principal (`GET /v1/whoami`); throws AccessDenied(401) for none. */
export async function identify(
  db: MetadataStore,
  token: string | undefined,
  keys: CapabilityKeys,
): Promise<Principal | AdminPrincipal> {
  return (
    (token && !token.startsWith(CAPABILITY_PREFIX) && (await findAdmin(db, token))) ||
    (await authenticate(db, token, keys))
  );
}

/**
 * Resolves an admin API caller. Admin tokens live apart from owner and service tokens; a valid token
 * of those kinds is known but not allowed here (403), anything else is not known (401).
 */
export async function authenticateAdmin(
  db: MetadataStore,
  token: string | undefined,
): Promise<AdminPrincipal> {
  if (token === undefined || token.length === 0) throw new AccessDenied(401, 'missing admin token');
  const admin = await findAdmin(db, token);
  if (admin) return admin;
  await authenticate(db, token); // throws 401 for an unknown, revoked or disabled owner's token
  throw new AccessDenied(403, 'this token is not an admin token');
}
