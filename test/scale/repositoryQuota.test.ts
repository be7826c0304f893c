import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { addOwner, listOwners, setQuota } from '../../repository/accounts/admin';
import { RepositoryClient, RepositoryError } from '../../repository/client';
import { clusterServers } from '../support/repositoryBackends';

// Quotas under concurrency across servers: the commit locks the owner's row, so the last bytes fit once.
const fleet = clusterServers(3, 'quota');
let token: string;

beforeAll(async () => {
  token = (await addOwner(fleet.dirs[0], 'alice')).token;
});

test('30 uploads racing on three servers for room for 10: at most 10 stored, the quota never passed', async () => {
  const size = 100_000;
  await setQuota(fleet.dirs[0], 'alice', { bytes: 10 * size, files: 100 });
  const clients = fleet.servers.map((s) => new RepositoryClient({ url: s.url, token }));
  const results = await Promise.all(
    Array.from({ length: 30 }, (_, i) =>
      clients[i % 3]
        .upload('alice', `race/f${i}.bin`, Readable.from([randomBytes(size)]))
        .then(() => 'stored' as const)
        .catch((err: unknown) => {
          if (err instanceof RepositoryError && err.status === 413) return 'refused' as const;
          throw err;
        }),
    ),
  );
  // A server refuses early what its own uploads in progress would overflow, so fewer may fit; never more.
  const stored = results.filter((r) => r === 'stored').length;
  expect(stored).toBeGreaterThan(0);
  expect(stored).toBeLessThanOrEqual(10);
  const listed = await clients[1].list('alice', 'race/');
  expect(listed).toHaveLength(stored);
  const [alice] = await listOwners(fleet.dirs[0]);
  // The counter the commits checked agrees with the rows.
  expect(alice.usage).toEqual({ bytes: stored * size, files: stored });
});
