import { promises as fs } from 'node:fs';
import path from 'node:path';
import { opt } from './commandLine';
import type { QmpClient } from './qmp';

/**
 * Live migration over TLS with the cluster's own CA (deploy/migration-tls.sh). Each host has one
 * certificate, `CN=<host>`, valid for both ends (serverAuth + clientAuth) and named by host in its SAN, in
 * a folder laid out as QEMU's `tls-creds-x509` reads it. Both ends verify the peer against the CA; the
 * target also requires the one source it was prepared for (`authz-simple` on that source's DN), so a host
 * outside the cluster, another cluster host, or a plain TCP stream cannot feed it memory.
 */

export const MIGRATION_TLS_CREDS_ID = 'vsp-migration-tls';
export const MIGRATION_TLS_AUTHZ_ID = 'vsp-migration-authz';
export const MIGRATION_TLS_FILES = [
  'ca-cert.pem',
  'server-cert.pem',
  'server-key.pem',
  'client-cert.pem',
  'client-key.pem',
] as const;

/** What the target tells the source: use TLS, and expect the target's certificate to name `hostname`. */
export interface IncomingTls {
  hostname: string;
}

/** The identity (certificate DN, as QEMU's authz sees it) of a host's migration certificate. */
export function migrationIdentityOf(host: string): string {
  return `CN=${host}`;
}

/** Throws, naming every missing file, unless `dir` holds a host's migration credentials. */
export async function checkMigrationTlsDir(dir: string): Promise<void> {
  if (!path.isAbsolute(dir)) throw new Error(`VSP_MIGRATION_TLS_DIR ${JSON.stringify(dir)} is not absolute`);
  const missing: string[] = [];
  for (const f of MIGRATION_TLS_FILES)
    if (
      !(await fs.stat(path.join(dir, f)).then(
        (s) => s.isFile(),
        () => false,
      ))
    )
      missing.push(f);
  if (missing.length > 0)
    throw new Error(
      `migration TLS folder ${dir} lacks ${missing.join(', ')}: generate it with deploy/migration-tls.sh`,
    );
}

/** The target's QEMU objects: server credentials that verify the client, accepting `sourceHost` only. */
export function incomingTlsArgs(dir: string, sourceHost: string): string[] {
  return [
    '-object',
    `tls-creds-x509,id=${MIGRATION_TLS_CREDS_ID},dir=${opt(dir)},endpoint=server,verify-peer=on`,
    '-object',
    `authz-simple,id=${MIGRATION_TLS_AUTHZ_ID},identity=${opt(migrationIdentityOf(sourceHost))}`,
  ];
}

/** The migration parameters of the target, set before it listens. */
export function incomingTlsParameters(): Record<string, string> {
  return { 'tls-creds': MIGRATION_TLS_CREDS_ID, 'tls-authz': MIGRATION_TLS_AUTHZ_ID, 'tls-hostname': '' };
}

/**
 * On the source, just before `migrate`: (re)creates the client credentials from `dir`, so renewed
 * certificates are used without restarting the VM, and returns the parameters that make QEMU use them and
 * check the target's name. `dir` undefined: a plain stream (all TLS parameters cleared, since QEMU keeps
 * the last ones).
 */
export async function outgoingTlsParameters(
  qmp: QmpClient,
  dir: string | undefined,
  target: IncomingTls | undefined,
  timeoutMs: number,
): Promise<Record<string, string>> {
  if (!dir || !target) return { 'tls-creds': '', 'tls-hostname': '', 'tls-authz': '' };
  // A previous attempt's object may remain; QEMU refuses to delete it only while a migration uses it.
  await qmp.execute('object-del', { id: MIGRATION_TLS_CREDS_ID }, timeoutMs).catch(() => undefined);
  await qmp.execute(
    'object-add',
    {
      'qom-type': 'tls-creds-x509',
      id: MIGRATION_TLS_CREDS_ID,
      dir,
      endpoint: 'client',
      'verify-peer': true,
    },
    timeoutMs,
  );
  return { 'tls-creds': MIGRATION_TLS_CREDS_ID, 'tls-hostname': target.hostname, 'tls-authz': '' };
}
