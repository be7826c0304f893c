import { createHash } from 'node:crypto';
import { utils } from 'ssh2';

/** SSH public keys as owners hand them in: one `authorized_keys`-style line. */

export interface PublicKeyInfo {
  /** e.g. 'ssh-ed25519'. */
  algorithm: string;
  /** The key's wire-format blob, base64: what a client presents at login. */
  keyData: string;
  /** SHA256:<base64>, as `ssh-keygen -l` prints it. */
  fingerprint: string;
  comment: string;
}

export function fingerprintOf(blob: Buffer): string {
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}

/** Parses `<algorithm> <base64> [comment]`; throws naming what is wrong. Private keys are refused. */
export function parsePublicKeyLine(line: string): PublicKeyInfo {
  const text = line.trim();
  if (text === '') throw new Error('the SSH public key is empty');
  if (text.includes('PRIVATE KEY')) throw new Error('that is a private key; give the public key (.pub)');
  const parsed = utils.parseKey(text);
  if (parsed instanceof Error) throw new Error(`not a valid SSH public key: ${parsed.message}`);
  if (parsed.isPrivateKey()) throw new Error('that is a private key; give the public key (.pub)');
  const blob = parsed.getPublicSSH();
  return {
    algorithm: parsed.type,
    keyData: blob.toString('base64'),
    fingerprint: fingerprintOf(blob),
    comment: parsed.comment,
  };
}
