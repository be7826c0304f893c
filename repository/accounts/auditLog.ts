import { closeSync, openSync, writeSync } from 'node:fs';
import path from 'node:path';

/**
 * Who did what, when, from where, on every protocol: one JSON object per line, appended with
 * O_APPEND so lines never interleave, written synchronously so an event is on record before the
 * client hears the answer.
 */

/** `cli`: the admin commands on the repository host (`vsp task grant`). */
export type AuditProtocol = 'http' | 'sftp' | 'ftps' | 'cli';

export interface AuditEvent {
  protocol: AuditProtocol;
  /** Client address as ip:port. */
  remote?: string;
  /**
   * Who acted: an owner name, `service:<token id>`, `capability:<id>` (a task's), `admin:<token id>`,
   * or the name a failed login gave. Never a secret.
   */
  user?: string;
  /** The task a capability was minted for (as the capability states it, when it was refused). */
  task?: string;
  /** Whose space was touched (differs from `user` for service tokens). */
  owner?: string;
  /** login, list, stat, download, upload, delete, mkdir, rmdir, rename, ... */
  action: string;
  path?: string;
  /** Rename target. */
  to?: string;
  result: 'ok' | 'denied' | 'failed';
  /** Why it was denied or failed. */
  detail?: string;
  bytes?: number;
}

export function defaultAuditLogPath(dataDir: string): string {
  return path.join(dataDir, 'audit.log');
}

export class AuditLog {
  private fd: number | undefined;

  private constructor(fd: number) {
    this.fd = fd;
  }

  static open(file: string): AuditLog {
    try {
      return new AuditLog(openSync(file, 'a', 0o600));
    } catch (err) {
      throw new Error(`cannot open audit log ${file}`, { cause: err });
    }
  }

  record(event: AuditEvent): void {
    if (this.fd === undefined) return;
    writeSync(this.fd, `${JSON.stringify({ time: new Date().toISOString(), ...event })}\n`);
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }
}

/** `ip:port` of a socket's peer, IPv6 in brackets. */
export function remoteOf(address: string | undefined, port: number | undefined): string | undefined {
  if (address === undefined) return undefined;
  return `${address.includes(':') ? `[${address}]` : address}:${port ?? 0}`;
}
