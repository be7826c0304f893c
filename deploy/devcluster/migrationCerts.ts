import path from 'node:path';
import { runCommand } from '../../lib/runCommand';
import { repoRoot } from './tools';

const CERT_TIMEOUT_MS = 60_000;

/**
 * A cluster CA in `<stateDir>/ca` and each host's migration credentials in `<stateDir>/<host>`, made by
 * deploy/migration-tls.sh as production hosts make theirs (idempotent: a rerun keeps what is there).
 * `hosts`: host name -> its address (named in the certificate). Returns host -> VSP_MIGRATION_TLS_DIR.
 */
export async function issueMigrationCerts<H extends string>(
  stateDir: string,
  hosts: Record<H, string>,
  clusterName = 'dev',
): Promise<Record<H, string>> {
  const script = path.join(repoRoot(), 'deploy', 'migration-tls.sh');
  const ca = path.join(stateDir, 'ca');
  await runCommand('bash', [script, 'ca', ca, clusterName], { timeoutMs: CERT_TIMEOUT_MS });
  const dirs = {} as Record<H, string>;
  for (const [host, address] of Object.entries(hosts) as [H, string][]) {
    dirs[host] = path.join(stateDir, host);
    await runCommand('bash', [script, 'host', ca, host, dirs[host], address], { timeoutMs: CERT_TIMEOUT_MS });
  }
  return dirs;
}
