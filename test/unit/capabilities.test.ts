import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { addOwner, withAdmin } from '../../repository/accounts/admin';
import {
  CAPABILITY_KEY_FILE,
  loadCapabilityKeys,
  mintCapability,
  PREVIOUS_CAPABILITY_KEY_FILE,
  verifyCapability,
} from '../../repository/accounts/capabilities';

/** The capability key's life: made once, private, rotated without cutting off capabilities already minted. */
let dataDir: string;

beforeEach(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-capkey-'));
  await addOwner(dataDir, 'alice');
});
afterEach(async () => {
  await fs.rm(dataDir, { recursive: true, force: true });
});

const grant = () => ({
  owner: 'alice',
  taskId: 't1',
  read: [],
  results: 'results/t1',
  exp: Math.floor(Date.now() / 1000) + 3600,
});

test('the key is made once, mode 0600, and a key readable by others is refused', async () => {
  const first = loadCapabilityKeys(dataDir);
  expect(loadCapabilityKeys(dataDir).signing.equals(first.signing)).toBe(true);
  const file = path.join(dataDir, CAPABILITY_KEY_FILE);
  expect((await fs.stat(file)).mode & 0o777).toBe(0o600);
  await fs.chmod(file, 0o644);
  expect(() => loadCapabilityKeys(dataDir)).toThrow(/readable by others: chmod 600 it/);
});

test('after a rotation, capabilities signed with the previous key stay valid until it is removed', async () => {
  const old = await withAdmin(dataDir, (_a, db) =>
    mintCapability(db, loadCapabilityKeys(dataDir), grant(), 'test'),
  );
  await fs.rename(path.join(dataDir, CAPABILITY_KEY_FILE), path.join(dataDir, PREVIOUS_CAPABILITY_KEY_FILE));
  const rotated = loadCapabilityKeys(dataDir);
  const fresh = await withAdmin(dataDir, (_a, db) => mintCapability(db, rotated, grant(), 'test'));
  await withAdmin(dataDir, async (_a, db) => {
    expect((await verifyCapability(db, rotated, old.token)).id).toBe(old.claims.id);
    expect((await verifyCapability(db, rotated, fresh.token)).id).toBe(fresh.claims.id);
  });
  await fs.rm(path.join(dataDir, PREVIOUS_CAPABILITY_KEY_FILE));
  const only = loadCapabilityKeys(dataDir);
  await withAdmin(dataDir, async (_a, db) => {
    await expect(verifyCapability(db, only, old.token)).rejects.toThrow(/signature is invalid/);
    expect((await verifyCapability(db, only, fresh.token)).id).toBe(fresh.claims.id);
  });
});

test('a correctly signed capability the database does not know is refused', async () => {
  const keys = loadCapabilityKeys(dataDir);
  const minted = await withAdmin(dataDir, (_a, db) => mintCapability(db, keys, grant(), 'test'));
  const elsewhere = path.join(dataDir, 'other');
  await addOwner(elsewhere, 'alice');
  await withAdmin(elsewhere, (_a, db) =>
    expect(verifyCapability(db, keys, minted.token)).rejects.toThrow(/not known to this repository/),
  );
});
