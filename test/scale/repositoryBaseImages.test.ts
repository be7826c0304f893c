import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { addOwner, createServiceToken } from '../../repository/accounts/admin';
import { RepositoryClient } from '../../repository/client';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';
import { withBackend } from '../../repository/store/backend';
import { addBaseImage } from '../../repository/store/imageStore';
import { useClusterBackend } from '../support/repositoryBackends';

// The provider's base images on `cluster`: added once (inspected, then stored in S3), served by any server.
const done = useClusterBackend();
let dir: string;
let servers: RepositoryServer[] = [];

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-base-'));
  servers = await Promise.all(
    [0, 1].map((i) => startRepositoryServer({ dataDir: path.join(dir, `s${i}`), port: 0 })),
  );
});

afterAll(async () => {
  await Promise.all(servers.map((s) => s.close()));
  await fs.rm(dir, { recursive: true, force: true });
});
done();

test('a base image added through the admin path is read back whole from every server', async () => {
  const image = path.join(dir, 'base.img');
  execFileSync('mke2fs', ['-q', '-t', 'ext4', image, '8M'], { stdio: 'pipe' });
  const sha = createHash('sha256')
    .update(await fs.readFile(image))
    .digest('hex');
  const admin = path.join(dir, 'admin');
  const added = await withBackend(admin, (b) => addBaseImage(b, 'debian-12', createReadStream(image)));
  expect(added).toMatchObject({ name: 'base:debian-12', status: 'ok', sha256: sha });
  await expect(
    withBackend(admin, (b) => addBaseImage(b, 'debian-12', createReadStream(image))),
  ).rejects.toThrow(/already exists/);
  const token = await createServiceToken(admin, 'hosts');
  await addOwner(admin, 'alice');
  for (const [i, s] of servers.entries()) {
    const dest = path.join(dir, `back-${i}.img`);
    // Hosts read base images in any owner's view.
    await new RepositoryClient({ url: s.url, token }).download('alice', 'base-images/debian-12', dest);
    expect(
      createHash('sha256')
        .update(await fs.readFile(dest))
        .digest('hex'),
    ).toBe(sha);
  }
});
