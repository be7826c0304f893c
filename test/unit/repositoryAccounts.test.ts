import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { parseLimit } from '../../cli/adminCommands';
import {
  addKey,
  addOwner,
  listKeys,
  listOwners,
  removeKey,
  setPassword,
  setQuota,
} from '../../repository/accounts/admin';
import { authenticate, authenticatePassword, hashToken } from '../../repository/accounts/auth';
import { MetadataDb, repositoryDbPath } from '../../repository/store/metadataDb';
import { localMetadata, type MetadataStore } from '../../repository/store/metadataStore';
import { generateEd25519KeyPair } from '../../lib/sshKeyPair';
import { fingerprintOf, parsePublicKeyLine } from '../../repository/accounts/sshKeys';
import { runAdminCli } from '../support/adminCli';

let dataDir: string;

beforeEach(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-accounts-'));
});
afterEach(async () => {
  await fs.rm(dataDir, { recursive: true, force: true });
});

async function withDb<T>(fn: (db: MetadataStore) => Promise<T>): Promise<T> {
  const db = localMetadata(MetadataDb.open(dataDir));
  try {
    return await fn(db);
  } finally {
    await db.close();
  }
}

describe('passwords', () => {
  test('are stored as argon2id hashes and checked on login', async () => {
    await addOwner(dataDir, 'alice');
    await setPassword(dataDir, 'alice', 'a long enough secret');
    const stored = await withDb((db) => db.getPasswordHash('alice'));
    expect(stored).toMatch(/^\$argon2id\$/);
    expect(await fs.readFile(repositoryDbPath(dataDir), 'latin1')).not.toContain('a long enough secret');
    await withDb(async (db) => {
      await expect(authenticatePassword(db, 'alice', 'a long enough secret')).resolves.toMatchObject({
        owner: 'alice',
        credential: { kind: 'password' },
      });
      await expect(authenticatePassword(db, 'alice', 'a long enough secreT')).rejects.toMatchObject({
        status: 401,
      });
      await expect(authenticatePassword(db, 'nobody', 'a long enough secret')).rejects.toMatchObject({
        status: 401,
      });
    });
    expect((await listOwners(dataDir))[0]).toMatchObject({ name: 'alice', hasPassword: true });
  });

  test('weak, token-like or ownerless passwords are refused', async () => {
    await addOwner(dataDir, 'alice');
    await expect(setPassword(dataDir, 'alice', 'short')).rejects.toThrow(/10-1024 characters/);
    await expect(setPassword(dataDir, 'alice', 'vsp_looks_like_a_token')).rejects.toThrow(/may not start/);
    await expect(setPassword(dataDir, 'bob', 'a long enough secret')).rejects.toThrow(/no such owner: bob/);
  });
});

describe('SSH keys', () => {
  test('public keys are parsed, fingerprinted and listed; private keys and junk are refused', async () => {
    await addOwner(dataDir, 'alice');
    const pair = generateEd25519KeyPair('alice@laptop');
    const info = parsePublicKeyLine(pair.public);
    expect(info.fingerprint).toBe(fingerprintOf(Buffer.from(info.keyData, 'base64')));
    const row = await addKey(dataDir, 'alice', pair.public);
    expect(row).toMatchObject({ owner: 'alice', name: 'alice@laptop', algorithm: 'ssh-ed25519' });
    await expect(addKey(dataDir, 'alice', pair.public)).rejects.toThrow(/already has key SHA256:/);
    await expect(addKey(dataDir, 'alice', pair.private)).rejects.toThrow(/private key/);
    await expect(addKey(dataDir, 'alice', 'ssh-ed25519 AAAAnotakey')).rejects.toThrow(
      /not a valid SSH public key/,
    );
    await expect(addKey(dataDir, 'alice', '')).rejects.toThrow(/empty/);
    await expect(addKey(dataDir, 'bob', pair.public)).rejects.toThrow(/no such owner/);
    expect((await listKeys(dataDir, 'alice')).map((k) => k.fingerprint)).toEqual([info.fingerprint]);
    await expect(removeKey(dataDir, 'alice', row.id + 1)).rejects.toThrow(/has no key with id/);
    await removeKey(dataDir, 'alice', row.id);
    expect(await listKeys(dataDir)).toEqual([]);
  });
});

describe('quotas', () => {
  test('are validated and shown with usage', async () => {
    await addOwner(dataDir, 'alice');
    await expect(setQuota(dataDir, 'alice', { bytes: -1 })).rejects.toThrow(
      /quota bytes must be a whole number/,
    );
    await expect(setQuota(dataDir, 'alice', { files: 1.5 })).rejects.toThrow(/quota files/);
    await setQuota(dataDir, 'alice', { bytes: 1000, files: 3 });
    expect((await listOwners(dataDir))[0]).toMatchObject({
      quotaBytes: 1000,
      quotaFiles: 3,
      usage: { bytes: 0, files: 0 },
    });
    await setQuota(dataDir, 'alice', {});
    expect((await listOwners(dataDir))[0].quotaBytes).toBeUndefined();
  });

  test('limits parse with units', () => {
    expect(parseLimit('none', '--bytes', true)).toBeUndefined();
    expect(parseLimit('10G', '--bytes', true)).toBe(10 * 1024 ** 3);
    expect(parseLimit('512MiB', '--bytes', true)).toBe(512 * 1024 ** 2);
    expect(parseLimit('12', '--files', false)).toBe(12);
    expect(() => parseLimit('12K', '--files', false)).toThrow(/--files "12K" must be a whole number/);
    expect(() => parseLimit('-3', '--bytes', true)).toThrow(/--bytes/);
  });
});

describe('schema', () => {
  test('a schema 1 database is migrated in place, keeping owners and tokens', async () => {
    const token = 'vsp_0123456789abcdef0123456789abcdef';
    const old = new Database(repositoryDbPath(dataDir));
    old.exec(`
      CREATE TABLE owners (name TEXT PRIMARY KEY, created TEXT NOT NULL, disabled INTEGER NOT NULL DEFAULT 0);
      CREATE TABLE tokens (id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT REFERENCES owners(name),
        service INTEGER NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created TEXT NOT NULL, revoked TEXT);
      CREATE TABLE files (owner TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
        mtime TEXT NOT NULL, PRIMARY KEY (owner, path)) WITHOUT ROWID;
      INSERT INTO owners (name, created) VALUES ('alice', '2025-01-01T00:00:00Z');
    `);
    old
      .prepare(
        `INSERT INTO tokens (owner, service, name, hash, created) VALUES ('alice', 0, 'default', ?, 'x')`,
      )
      .run(hashToken(token));
    old.pragma('user_version = 1');
    old.close();
    await withDb(async (db) => {
      expect(await db.getOwner('alice')).toMatchObject({
        name: 'alice',
        hasPassword: false,
        disabled: false,
      });
      await expect(authenticate(db, token)).resolves.toMatchObject({ kind: 'owner', owner: 'alice' });
      expect(await db.listKeys()).toEqual([]);
    });
    // Opening again is a no-op.
    expect(await withDb((db) => db.usage('alice'))).toEqual({ bytes: 0, files: 0 });
  });
});

describe('admin CLI', () => {
  const vsp = (...args: string[]) => runAdminCli(dataDir, ...args);

  test('owner, token, key, password and quota commands work end to end', async () => {
    const token = (await vsp('owner', 'add', 'alice')).trim();
    expect(token).toMatch(/^vsp_/);
    const pwFile = path.join(dataDir, 'pw');
    await fs.writeFile(pwFile, 'a long enough secret\nignored second line\n');
    await vsp('password', 'set', 'alice', '--from-file', pwFile);
    await withDb((db) =>
      expect(authenticatePassword(db, 'alice', 'a long enough secret')).resolves.toBeTruthy(),
    );

    const pubFile = path.join(dataDir, 'id.pub');
    await fs.writeFile(pubFile, generateEd25519KeyPair('cli@test').public);
    await vsp('key', 'add', 'alice', pubFile, '--name', 'laptop');
    const keys = JSON.parse(await vsp('--json', 'key', 'list', 'alice')) as { id: number; name: string }[];
    expect(keys.map((k) => k.name)).toEqual(['laptop']);
    await vsp('key', 'remove', 'alice', String(keys[0].id));
    expect(await listKeys(dataDir, 'alice')).toEqual([]);

    const second = (await vsp('token', 'create', 'alice', 'ci')).trim();
    const tokens = JSON.parse(await vsp('--json', 'token', 'list', 'alice')) as {
      id: number;
      name: string;
    }[];
    expect(tokens.map((t) => t.name)).toEqual(['default', 'ci']);
    await vsp('token', 'revoke', String(tokens[1].id));
    await withDb(async (db) => {
      await expect(authenticate(db, second)).rejects.toThrow(/revoked/);
      await expect(authenticate(db, token)).resolves.toMatchObject({ owner: 'alice' });
    });

    await vsp('owner', 'quota', 'alice', '--bytes', '1G', '--files', 'none');
    await vsp('owner', 'disable', 'alice');
    const [owner] = JSON.parse(await vsp('--json', 'owner', 'list')) as {
      disabled: boolean;
      quotaBytes: number;
    }[];
    expect(owner).toMatchObject({ disabled: true, quotaBytes: 1024 ** 3 });
    await withDb((db) => expect(authenticate(db, token)).rejects.toThrow(/disabled/));
    await vsp('owner', 'enable', 'alice');
    await withDb((db) => expect(authenticate(db, token)).resolves.toMatchObject({ owner: 'alice' }));

    await expect(vsp('token', 'revoke', 'abc')).rejects.toThrow(/token id "abc" must be a whole number/);
    await expect(vsp('owner', 'quota', 'alice', '--bytes', 'lots', '--files', '1')).rejects.toThrow(
      /--bytes/,
    );
  });
});
