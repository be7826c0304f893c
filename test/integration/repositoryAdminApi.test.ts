import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { addOwner, createServiceToken } from '../../repository/accounts/admin';
import { RepositoryClient, RepositoryError } from '../../repository/client';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';
import { generateEd25519KeyPair } from '../../lib/sshKeyPair';
import { sha256File } from '../../storage/imageCache';
import { runAdminCli } from '../support/adminCli';
import { refusal, SftpTestClient } from '../support/sftpTestClient';

const PASSWORD = 'correct horse battery staple';

let dataDir: string;
let server: RepositoryServer;
let adminToken: string;
let adminId: number;
let aliceToken: string;
let serviceToken: string;

/** Runs a `vsp` admin command with --json and returns its parsed output. */
async function vsp(...args: string[]): Promise<unknown> {
  return JSON.parse(await runAdminCli(dataDir, '--json', ...args)) as unknown;
}

interface Reply {
  status: number;
  body: Record<string, unknown> & { error?: string };
}

async function call(
  method: string,
  route: string,
  opts: { token?: string | null; json?: unknown; body?: Buffer } = {},
): Promise<Reply> {
  const headers: Record<string, string> = {};
  const token = opts.token === undefined ? adminToken : opts.token;
  if (token !== null) headers.Authorization = `Bearer ${token}`;
  let body: string | Buffer | undefined = opts.body;
  if (opts.json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(opts.json);
  }
  const res = await fetch(`${server.url}/v1/admin/${route}`, { method, headers, body });
  const text = await res.text();
  return { status: res.status, body: text ? (JSON.parse(text) as Reply['body']) : {} };
}

async function auditLines(): Promise<Record<string, unknown>[]> {
  return (await fs.readFile(path.join(dataDir, 'audit.log'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

const sftpLogin = (username: string, auth: { password?: string; privateKey?: string }) =>
  SftpTestClient.connect({ port: server.sftp?.port ?? 0, username, ...auth });

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-adminapi-'));
  aliceToken = (await addOwner(dataDir, 'alice')).token;
  serviceToken = await createServiceToken(dataDir, 'hosts');
  const created = (await vsp('admin', 'token', 'create', 'ops')) as { id: number; token: string };
  [adminId, adminToken] = [created.id, created.token];
  server = await startRepositoryServer({ dataDir, port: 0, sftp: { port: 0 } });
});

afterAll(async () => {
  await server?.close();
  await fs.rm(dataDir, { recursive: true, force: true });
});

describe('admin API credentials', () => {
  test('no token is 401, an unknown one 401, owner and service tokens 403, all audited as denied', async () => {
    expect((await call('GET', 'owners', { token: null })).status).toBe(401);
    expect((await call('GET', 'owners', { token: 'vsp_not-a-real-token-at-all' })).status).toBe(401);
    const asOwner = await call('GET', 'owners', { token: aliceToken });
    expect(asOwner).toEqual({ status: 403, body: { error: 'this token is not an admin token' } });
    expect((await call('POST', 'owners', { token: serviceToken, json: { name: 'eve' } })).status).toBe(403);
    expect((await call('GET', 'owners')).status).toBe(200);
    // An admin token is no owner or service token: the file API does not know it.
    const asAdmin = new RepositoryClient({ url: server.url, token: adminToken });
    expect(await asAdmin.list('alice').catch((e: unknown) => (e as RepositoryError).status)).toBe(401);
    const denied = (await auditLines()).filter((e) => e.result === 'denied' && e.path === 'admin/owners');
    expect(denied).toHaveLength(4);
    expect(denied.every((e) => e.protocol === 'http' && typeof e.remote === 'string')).toBe(true);
  });

  test('a revoked admin token stops working at once', async () => {
    const other = (await vsp('admin', 'token', 'create', 'temp')) as { id: number; token: string };
    expect((await call('GET', 'owners', { token: other.token })).status).toBe(200);
    await vsp('admin', 'token', 'revoke', String(other.id));
    expect(await call('GET', 'owners', { token: other.token })).toEqual({
      status: 401,
      body: { error: 'admin token has been revoked' },
    });
    const listed = (await vsp('admin', 'token', 'list')) as { id: number; revoked?: string }[];
    expect(listed.map((t) => [t.id, t.revoked !== undefined])).toEqual([
      [adminId, false],
      [other.id, true],
    ]);
  });
});

describe('admin API routes', () => {
  test('owners: add, list, quota; bad input is a clear 400, a taken name 409', async () => {
    const added = await call('POST', 'owners', { json: { name: 'carol' } });
    expect(added.status).toBe(201);
    expect(added.body).toMatchObject({ owner: 'carol', token: expect.stringMatching(/^vsp_/) });
    const carol = new RepositoryClient({ url: server.url, token: added.body.token as string });
    await carol.upload('carol', 'a.txt', Readable.from([Buffer.from('hello')]), { size: 5 });
    expect((await call('POST', 'owners', { json: { name: 'carol' } })).status).toBe(409);
    expect(await call('POST', 'owners', { json: { name: 'Bad Name' } })).toEqual({
      status: 400,
      body: { error: expect.stringMatching(/owner name "Bad Name" is invalid/) },
    });
    expect(await call('POST', 'owners', { json: { name: 'x', admin: true } })).toEqual({
      status: 400,
      body: { error: expect.stringMatching(/invalid new owner/) },
    });
    const listed = await call('GET', 'owners');
    expect((listed.body.owners as { name: string }[]).map((o) => o.name)).toEqual(['alice', 'carol']);
    expect((listed.body.owners as { usage: unknown }[])[1].usage).toEqual({ bytes: 5, files: 1 });
    const quota = await call('PATCH', 'owners/carol', { json: { quota: { bytes: 5, files: null } } });
    expect(quota).toMatchObject({ status: 200, body: { name: 'carol', quotaBytes: 5 } });
    expect(quota.body.quotaFiles).toBeUndefined();
    const over = await carol
      .upload('carol', 'b.txt', Readable.from([Buffer.from('x')]), { size: 1 })
      .catch((e: unknown) => e);
    expect(over).toMatchObject({ status: 413 });
    expect((await call('PATCH', 'owners/nobody', { json: { disabled: true } })).status).toBe(404);
    expect((await call('DELETE', 'owners')).status).toBe(405);
    expect((await call('GET', 'nothing-here')).status).toBe(404);
  });

  test('tokens: create for an owner or for hosts, list, revoke', async () => {
    const made = await call('POST', 'tokens', { json: { owner: 'alice', name: 'ci' } });
    expect(made).toMatchObject({ status: 201, body: { owner: 'alice', id: expect.any(Number) } });
    const ci = new RepositoryClient({ url: server.url, token: made.body.token as string });
    expect(await ci.list('alice')).toEqual([]);
    const service = await call('POST', 'tokens', { json: { service: true, name: 'hosts-2' } });
    expect(service.status).toBe(201);
    const hosts = new RepositoryClient({ url: server.url, token: service.body.token as string });
    expect(await hosts.stat('alice', 'base-images/none')).toBeUndefined();
    expect((await call('DELETE', `tokens/${made.body.id as number}`)).status).toBe(204);
    expect(await ci.list('alice').catch((e: unknown) => (e as RepositoryError).status)).toBe(401);
    expect((await call('DELETE', `tokens/${made.body.id as number}`)).status).toBe(404);
    const listed = await call('GET', 'tokens?owner=alice');
    expect(
      (listed.body.tokens as { name: string; revoked?: string }[]).map((t) => [t.name, !!t.revoked]),
    ).toEqual([
      ['default', false],
      ['ci', true],
    ]);
    expect((await call('POST', 'tokens', { json: { owner: 'nobody', name: 'x' } })).status).toBe(404);
    expect((await call('DELETE', 'tokens/abc')).status).toBe(400);
  });

  test('passwords and SSH keys: set, use, remove', async () => {
    expect((await call('PUT', 'owners/alice/password', { json: { password: 'short' } })).status).toBe(400);
    expect((await call('PUT', 'owners/alice/password', { json: { password: PASSWORD } })).status).toBe(204);
    (await sftpLogin('alice', { password: PASSWORD })).end();
    const pair = generateEd25519KeyPair('alice@laptop');
    const key = await call('POST', 'owners/alice/keys', { json: { publicKey: pair.public } });
    expect(key).toMatchObject({ status: 201, body: { owner: 'alice', name: 'alice@laptop' } });
    expect((await call('POST', 'owners/alice/keys', { json: { publicKey: 'junk' } })).status).toBe(400);
    const keys = await call('GET', 'keys?owner=alice');
    expect((keys.body.keys as { id: number }[]).map((k) => k.id)).toEqual([key.body.id]);
    const c = await sftpLogin('alice', { privateKey: pair.private });
    expect((await call('DELETE', `owners/alice/keys/${key.body.id as number}`)).status).toBe(204);
    // The session that logged in with the key ends at its next request.
    expect(await refusal(c.readdir('/'))).toMatch(/SSH key has been removed/);
    c.end();
    expect(await refusal(sftpLogin('alice', { privateKey: pair.private }))).not.toBe('');
    expect((await call('DELETE', 'owners/alice/password')).status).toBe(204);
    expect(await refusal(sftpLogin('alice', { password: PASSWORD }))).not.toBe('');
    await call('PUT', 'owners/alice/password', { json: { password: PASSWORD } });
  });

  test('disabling an owner cuts its open sessions and tokens at once; enabling lets it back in', async () => {
    const alice = new RepositoryClient({ url: server.url, token: aliceToken });
    const c = await sftpLogin('alice', { password: PASSWORD });
    expect(await c.readdir('/')).toBeDefined();
    const off = await call('PATCH', 'owners/alice', { json: { disabled: true } });
    expect(off).toMatchObject({ status: 200, body: { name: 'alice', disabled: true } });
    expect(await refusal(c.readdir('/'))).toMatch(/owner alice is disabled/);
    c.end();
    expect(await alice.list('alice').catch((e: unknown) => (e as RepositoryError).status)).toBe(401);
    expect(await refusal(sftpLogin('alice', { password: PASSWORD }))).not.toBe('');
    expect((await call('PATCH', 'owners/alice', { json: { disabled: false } })).status).toBe(200);
    expect(await alice.list('alice')).toEqual([]);
  });

  test('base images: add (checked), list, refuse owners, remove', async () => {
    const work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-adminapi-img-'));
    try {
      const img = path.join(work, 'small.qcow2');
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M'], { stdio: 'pipe' });
      const bytes = await fs.readFile(img);
      const added = await call('PUT', 'base-images/small', { body: bytes });
      expect(added).toMatchObject({
        status: 201,
        body: {
          name: 'base:small',
          origin: 'provider',
          status: 'ok',
          format: 'qcow2',
          sha256: await sha256File(img),
        },
      });
      expect((await call('PUT', 'base-images/small', { body: bytes })).status).toBe(409);
      expect(await call('PUT', 'base-images/junk', { body: Buffer.from('junk') })).toEqual({
        status: 400,
        body: { error: expect.stringMatching(/not a disk image/) },
      });
      expect((await call('PUT', 'base-images/small', { token: aliceToken, body: bytes })).status).toBe(403);
      const listed = await call('GET', 'base-images');
      expect((listed.body.images as { name: string }[]).map((i) => i.name)).toEqual(['base:small']);
      const alice = new RepositoryClient({ url: server.url, token: aliceToken });
      expect((await alice.listImages('alice')).map((i) => i.name)).toEqual(['base:small']);
      expect((await call('DELETE', 'base-images/small')).status).toBe(204);
      expect((await call('DELETE', 'base-images/small')).status).toBe(404);
      expect(await alice.listImages('alice')).toEqual([]);
      expect(await fs.readdir(path.join(dataDir, 'base-images'))).toEqual([]);
    } finally {
      await fs.rm(work, { recursive: true, force: true });
    }
  });

  test('the CLI adds and removes base images on the repository host, next to the running server', async () => {
    const work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-adminapi-cli-'));
    try {
      const img = path.join(work, 'cli.qcow2');
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M'], { stdio: 'pipe' });
      expect(await vsp('image', 'add-base', img, '--name', 'from-cli')).toMatchObject({
        name: 'base:from-cli',
        status: 'ok',
        format: 'qcow2',
        virtualBytes: 8 * 1024 * 1024,
      });
      const listed = await call('GET', 'base-images');
      expect((listed.body.images as { name: string }[]).map((i) => i.name)).toEqual(['base:from-cli']);
      await expect(vsp('image', 'add-base', img, '--name', 'Bad/Name')).rejects.toThrow(/must match/);
      expect(await vsp('image', 'remove-base', 'from-cli')).toEqual({ name: 'from-cli', removed: true });
      expect((await call('GET', 'base-images')).body.images).toEqual([]);
    } finally {
      await fs.rm(work, { recursive: true, force: true });
    }
  });

  test('every admin action is audited with the admin token id, what was done and to whom', async () => {
    const ok = (await auditLines()).filter((e) => e.user === `admin:${adminId}` && e.result === 'ok');
    const actions = new Set(ok.map((e) => e.action));
    for (const a of [
      'admin-owner-list',
      'admin-owner-add',
      'admin-owner-quota',
      'admin-owner-disable',
      'admin-owner-enable',
      'admin-token-create',
      'admin-token-create-service',
      'admin-token-revoke',
      'admin-token-list',
      'admin-password-set',
      'admin-password-clear',
      'admin-key-add',
      'admin-key-list',
      'admin-key-remove',
      'admin-base-image-add',
      'admin-base-image-list',
      'admin-base-image-remove',
    ])
      expect(actions).toContain(a);
    expect(ok.find((e) => e.action === 'admin-owner-disable')).toMatchObject({
      protocol: 'http',
      owner: 'alice',
      path: 'admin/owners/alice',
    });
    const failed = (await auditLines()).filter((e) => e.user === `admin:${adminId}` && e.result === 'failed');
    expect(failed.find((e) => e.action === 'admin-owner-add')?.detail).toMatch(/already exists|invalid/);
  });
});
