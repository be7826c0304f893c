import { z } from 'zod';

/**
 * A task capability: what one task may read and write in its owner's repository space, signed by the
 * repository (HMAC-SHA256 with a key only the repository holds). It travels in the workflow input; host
 * workers present it as the bearer credential for that task's transfers, and the repository checks
 * signature, scope, expiry, revocation and that the owner is enabled on every request.
 *
 * Wire form: `vspcap_<base64url(JSON claims)>.<base64url(signature over the claims part)>`.
 * This module only reads the claims (no Node APIs: workflow code imports it); minting and verifying
 * live with the repository's accounts.
 */
export const CAPABILITY_PREFIX = 'vspcap_';
export const CAPABILITY_VERSION = 1;

export const CapabilityClaimsSchema = z
  .object({
    v: z.literal(CAPABILITY_VERSION),
    /** Unique id: revocation (task ended, owner disabled) names it. */
    id: z.string().min(8).max(64),
    owner: z.string().min(1).max(64),
    /** The workflow id this capability was minted for; hosts refuse it for any other task. */
    taskId: z.string().min(1).max(1000),
    /** Repository paths (owner's view) the task may read: its inputs. */
    read: z.array(z.string()).max(1000),
    /** The image the task boots from, in the owner's view (`images/x.qcow2`, `base-images/n`), if any. */
    image: z.string().optional(),
    /** The task's results folder: write (and read back) under it, nothing else. */
    results: z.string().min(1),
    /** Unix seconds after which the repository refuses it. */
    exp: z.number().int().positive(),
  })
  .strict();

export type CapabilityClaims = z.infer<typeof CapabilityClaimsSchema>;

const B64URL = /^[A-Za-z0-9_-]+$/;

function base64UrlDecode(s: string): string {
  const b64 = s.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (s.length % 4)) % 4);
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
}

/**
 * The claims of a capability, unverified (only the repository can verify it). Throws an Error naming
 * what is wrong with its form.
 */
export function decodeCapabilityClaims(token: string): CapabilityClaims {
  if (typeof token !== 'string' || !token.startsWith(CAPABILITY_PREFIX))
    throw new Error(`a capability starts with '${CAPABILITY_PREFIX}'`);
  const [payload, sig, ...rest] = token.slice(CAPABILITY_PREFIX.length).split('.');
  if (!payload || !sig || rest.length > 0 || !B64URL.test(payload) || !B64URL.test(sig))
    throw new Error('a capability is two base64url parts joined by a dot');
  let json: unknown;
  try {
    json = JSON.parse(base64UrlDecode(payload));
  } catch (err) {
    throw new Error(`a capability's claims are not JSON: ${(err as Error).message}`);
  }
  const r = CapabilityClaimsSchema.safeParse(json);
  if (!r.success)
    throw new Error(
      `invalid capability claims: ${r.error.issues.map((i) => `${i.path.join('.') || 'claims'}: ${i.message}`).join('; ')}`,
    );
  return r.data;
}
