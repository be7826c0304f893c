import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { constants as fsc, closeSync, fstatSync, openSync, readFileSync, writeSync } from 'node:fs';
import path from 'node:path';
import {
  CAPABILITY_PREFIX,
  CAPABILITY_VERSION,
  decodeCapabilityClaims,
  type CapabilityClaims,
} from '../../spec/capability';
import { AccessDenied } from './auth';
import type { MetadataStore } from '../store/metadataStore';

/**
 * Task capabilities (the wire form and claims are spec/capability.ts's): minted here for one task at
 * submission, verified on every request that presents one. The HMAC-SHA256 key lives only in the
 * repository's data dir (`capability.key`, made at first start, mode 0600); each minted capability is
 * also recorded in the metadata DB, so a capability must be both correctly signed and known (and not
 * revoked) to be accepted.
 *
 * Key rotation (an operator step, see deploy/production/README.md): with the repository stopped, rename
 * `capability.key` to `capability.key.previous` and start it again; a new key is made and signs from
 * then on, while capabilities signed with the previous one stay valid until they expire.
 */

export const CAPABILITY_KEY_FILE = 'capability.key';
export const PREVIOUS_CAPABILITY_KEY_FILE = 'capability.key.previous';
const KEY_BYTES = 32;

/**
 * How long a capability outlives its task's time limit: staging in and out and cleanup (a day), and the
 * 7 days a host keeps a finished task's outputs while it waits for the repository to take them.
 */
export const CAPABILITY_MARGIN_SEC = 8 * 24 * 3600;

/** The signing key and the keys still accepted (the previous one, during a rotation). */
export interface CapabilityKeys {
  signing: Buffer;
  accepted: Buffer[];
}

function readKey(file: string): Buffer | undefined {
  let fd: number;
  try {
    fd = openSync(file, fsc.O_RDONLY | fsc.O_NOFOLLOW);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new Error(`cannot open the capability key ${file}`, { cause: err });
  }
  try {
    // Anyone who can read the key can mint capabilities for every owner.
    if ((fstatSync(fd).mode & 0o077) !== 0)
      throw new Error(`the capability key ${file} is readable by others: chmod 600 it`);
    const key = Buffer.from(readFileSync(fd, 'utf8').trim(), 'base64url');
    if (key.length !== KEY_BYTES) throw new Error(`the capability key ${file} is not ${KEY_BYTES} bytes`);
    return key;
  } finally {
    closeSync(fd);
  }
}

/** Loads the data dir's capability keys, making the signing key on first use (never logged). */
export function loadCapabilityKeys(dataDir: string): CapabilityKeys {
  const file = path.join(dataDir, CAPABILITY_KEY_FILE);
  let signing = readKey(file);
  if (!signing) {
    const fresh = randomBytes(KEY_BYTES);
    try {
      const fd = openSync(file, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
      try {
        writeSync(fd, `${fresh.toString('base64url')}\n`);
      } finally {
        closeSync(fd);
      }
      signing = fresh;
    } catch (err) {
      // Another process (the server, an admin command) made it first: use theirs.
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST')
        throw new Error(`cannot create the capability key ${file}`, { cause: err });
      signing = readKey(file)!;
    }
  }
  const previous = readKey(path.join(dataDir, PREVIOUS_CAPABILITY_KEY_FILE));
  return { signing, accepted: previous ? [signing, previous] : [signing] };
}

function sign(key: Buffer, payload: string): Buffer {
  return createHmac('sha256', key).update(payload, 'utf8').digest();
}

/** What a capability grants, before it has an id and a signature. */
export type CapabilityGrant = Omit<CapabilityClaims, 'v' | 'id'>;

/** Mints a capability and records it; `mintedBy` says who asked (owner:<name>, admin:cli). */
export async function mintCapability(
  db: MetadataStore,
  keys: CapabilityKeys,
  grant: CapabilityGrant,
  mintedBy: string,
): Promise<{ token: string; claims: CapabilityClaims }> {
  const claims: CapabilityClaims = {
    v: CAPABILITY_VERSION,
    id: randomBytes(12).toString('base64url'),
    ...grant,
  };
  const payload = Buffer.from(JSON.stringify(claims), 'utf8').toString('base64url');
  const token = `${CAPABILITY_PREFIX}${payload}.${sign(keys.signing, payload).toString('base64url')}`;
  await db.insertCapability({
    id: claims.id,
    owner: claims.owner,
    taskId: claims.taskId,
    results: claims.results,
    expires: claims.exp,
    mintedBy,
  });
  return { token, claims };
}

/** The claims a capability states, unverified, for the audit log of a refused one; undefined if unreadable. */
export function claimedCapability(token: string): CapabilityClaims | undefined {
  try {
    return decodeCapabilityClaims(token);
  } catch {
    return undefined;
  }
}

/**
 * The claims of a valid capability: signed with an accepted key, not expired, recorded and not revoked,
 * its owner existing and enabled. Throws AccessDenied(401) otherwise; checked on every request, so a
 * revocation or a disabled owner takes effect at once.
 */
export async function verifyCapability(
  db: MetadataStore,
  keys: CapabilityKeys,
  token: string,
  nowMs = Date.now(),
): Promise<CapabilityClaims> {
  let claims: CapabilityClaims;
  try {
    claims = decodeCapabilityClaims(token);
  } catch (err) {
    throw new AccessDenied(401, `malformed capability: ${(err as Error).message}`);
  }
  const [payload, sig] = token.slice(CAPABILITY_PREFIX.length).split('.');
  const presented = Buffer.from(sig, 'base64url');
  const valid = keys.accepted.some((k) => {
    const expected = sign(k, payload);
    return presented.length === expected.length && timingSafeEqual(presented, expected);
  });
  if (!valid) throw new AccessDenied(401, 'capability signature is invalid');
  if (claims.exp * 1000 <= nowMs)
    throw new AccessDenied(401, `capability expired at ${new Date(claims.exp * 1000).toISOString()}`);
  const row = await db.getCapability(claims.id);
  if (!row || row.owner !== claims.owner || row.taskId !== claims.taskId)
    throw new AccessDenied(401, 'capability is not known to this repository');
  if (row.revoked !== undefined) throw new AccessDenied(401, 'capability has been revoked');
  const owner = await db.getOwner(claims.owner);
  if (!owner || owner.disabled) throw new AccessDenied(401, `owner ${claims.owner} is disabled`);
  return claims;
}

/** Is `repoPath` the folder `folder` or inside it? */
export function isUnder(repoPath: string, folder: string): boolean {
  return repoPath === folder || repoPath.startsWith(`${folder}/`);
}
