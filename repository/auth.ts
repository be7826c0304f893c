import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { MetadataDb } from './metadataDb';

/**
 * Access tokens and who may touch which owner's space. Protocol-neutral: HTTP passes a bearer
 * token, SFTP/FTPS will pass a password, both end up in `authenticate` and `authorise`.
 */

export const TOKEN_PREFIX = 'vsp_';
/** Tokens supplied from outside (a service token in the environment) must carry some entropy. */
export const MIN_SUPPLIED_TOKEN_LENGTH = 16;

/** Who a valid token speaks for. */
export type Principal =
  { kind: 'owner'; owner: string; tokenId: number } | { kind: 'service'; tokenId: number };

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

/** Resolves a presented token to its principal, or throws AccessDenied(401). */
export function authenticate(db: MetadataDb, token: string | undefined): Principal {
  if (token === undefined || token.length === 0) throw new AccessDenied(401, 'missing access token');
  const hash = hashToken(token);
  const row = db.findTokenByHash(hash);
  // The lookup is by hash already; the constant-time re-check keeps the comparison itself timing-safe.
  if (!row || !timingSafeEqual(Buffer.from(row.hash, 'hex'), Buffer.from(hash, 'hex'))) {
    throw new AccessDenied(401, 'invalid access token');
  }
  if (row.revoked !== undefined) throw new AccessDenied(401, 'access token has been revoked');
  if (row.owner === undefined) return { kind: 'service', tokenId: row.id };
  const owner = db.getOwner(row.owner);
  if (!owner || owner.disabled) throw new AccessDenied(401, `owner ${row.owner} is disabled`);
  return { kind: 'owner', owner: row.owner, tokenId: row.id };
}

/**
 * May `principal` read and write `owner`'s space? Owner tokens reach only their own space (and learn
 * nothing about others, not even whether they exist); service tokens reach every enabled owner.
 */
export function authorise(db: MetadataDb, principal: Principal, owner: string): void {
  if (principal.kind === 'owner') {
    if (principal.owner !== owner) throw new AccessDenied(403, `this token may not access owner ${owner}`);
    return;
  }
  const row = db.getOwner(owner);
  if (!row) throw new AccessDenied(404, `no such owner: ${owner}`);
  if (row.disabled) throw new AccessDenied(403, `owner ${owner} is disabled`);
}

/** Records a supplied service token under `name` unless a token with its hash already exists. */
export function ensureServiceToken(db: MetadataDb, token: string, name: string): void {
  if (token.length < MIN_SUPPLIED_TOKEN_LENGTH) {
    throw new Error(`service token is too short: at least ${MIN_SUPPLIED_TOKEN_LENGTH} characters required`);
  }
  const existing = db.findTokenByHash(hashToken(token));
  if (existing) {
    if (existing.owner !== undefined) throw new Error('the supplied service token is already an owner token');
    if (existing.revoked !== undefined) throw new Error('the supplied service token has been revoked');
    return;
  }
  db.insertToken(undefined, name, hashToken(token));
}
