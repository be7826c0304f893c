import { randomInt } from 'node:crypto';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';

/**
 * A repository on `dataDir` serving HTTP, SFTP and FTPS on ephemeral ports; FTPS's passive range is
 * drawn at random so that test files running side by side rarely meet.
 */
export function startAllProtocols(dataDir: string): Promise<RepositoryServer> {
  const min = randomInt(30_000, 60_000);
  return startRepositoryServer({
    dataDir,
    port: 0,
    sftp: { port: 0 },
    ftps: { port: 0, pasvPorts: { min, max: min + 40 } },
  });
}
