import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Client, FTPError } from 'basic-ftp';
import { addKey, addOwner, setPassword } from '../../repository/accounts/admin';
import { AccessDenied } from '../../repository/accounts/auth';
import { RepositoryClient, RepositoryError } from '../../repository/client';
import {
  addressKey,
  LoginRateLimited,
  LoginThrottle,
  MemoryThrottleStore,
} from '../../repository/accounts/loginThrottle';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';
import { generateEd25519KeyPair } from '../../lib/sshKeyPair';
import { SftpTestClient } from '../support/sftpTestClient';

const PASSWORD = 'correct horse battery staple';
/** Small limits, so a few failures lock out; lockouts long enough to outlast a test. */
const LIMITS = { maxFailuresPerAddress: 3, maxFailuresPerAccount: 5, windowMs: 60_000, lockoutMs: 60_000 };

describe('LoginThrottle', () => {
  const denied = (): never => {
    throw new AccessDenied(401, 'wrong name or password');
  };
  let now = 1_000_000;
  const throttle = (): LoginThrottle =>
    new LoginThrottle({ ...LIMITS, lockoutMs: 1000 }, new MemoryThrottleStore(), () => now);
  const refusal = async (p: Promise<unknown>): Promise<unknown> =>
    p.then(
      () => undefined,
      (e: unknown) => e,
    );

  test('locks an address out after N failures, with a lockout that doubles per further failure', async () => {
    const t = throttle();
    const from = { address: '10.0.0.1', account: 'alice' };
    for (let i = 0; i < 3; i++) expect(await refusal(t.guard(from, denied))).toBeInstanceOf(AccessDenied);
    const limited = await refusal(t.guard(from, () => 'ok'));
    expect(limited).toBeInstanceOf(LoginRateLimited);
    expect((limited as LoginRateLimited).message).toMatch(
      /rate-limited: too many failed logins from 10\.0\.0\.1/,
    );
    expect((limited as LoginRateLimited).retryAfterSeconds).toBe(1);
    // Another address is not affected.
    expect(await t.guard({ address: '10.0.0.2', account: 'alice' }, () => 'ok')).toBe('ok');
    now += 1000;
    expect(await refusal(t.guard(from, denied))).toBeInstanceOf(AccessDenied);
    // The 4th failure locks for 2 s, the 5th would lock for 4 s.
    now += 1999;
    expect(await refusal(t.guard(from, () => 'ok'))).toBeInstanceOf(LoginRateLimited);
    now += 1;
    expect(await t.guard(from, () => 'ok')).toBe('ok');
    // Failures age out of the window.
    now += LIMITS.windowMs;
    for (let i = 0; i < 2; i++) await refusal(t.guard(from, denied));
    expect(await t.guard(from, () => 'ok')).toBe('ok');
  });

  test('locks an account out across addresses; a success clears the account, not the address', async () => {
    const t = throttle();
    for (let i = 0; i < 5; i++)
      expect(await refusal(t.guard({ address: `10.1.0.${i}`, account: 'bob' }, denied))).toBeInstanceOf(
        AccessDenied,
      );
    const limited = await refusal(t.guard({ address: '10.1.1.1', account: 'bob' }, () => 'ok'));
    expect((limited as Error).message).toMatch(/too many failed logins for bob/);
    now += 1000;
    const from = { address: '10.2.0.1', account: 'carol' };
    for (let i = 0; i < 2; i++) await refusal(t.guard(from, denied));
    await t.guard(from, () => 'ok');
    // The address still holds its two failures: one more locks it.
    await refusal(t.guard({ address: '10.2.0.1', account: 'dave' }, denied));
    expect(await refusal(t.guard(from, () => 'ok'))).toBeInstanceOf(LoginRateLimited);
  });

  test('IPv6 addresses count by /64 and IPv4-mapped ones as IPv4; bad options are refused', () => {
    expect(addressKey('2001:db8:1:2:aaaa::1')).toBe('2001:db8:1:2::/64');
    expect(addressKey('2001:db8:1:2::ffff')).toBe('2001:db8:1:2::/64');
    expect(addressKey('::1')).toBe('0:0:0:0::/64');
    expect(addressKey('::ffff:192.0.2.7')).toBe('192.0.2.7');
    expect(addressKey('192.0.2.7')).toBe('192.0.2.7');
    expect(() => new LoginThrottle({ windowMs: 0 })).toThrow(/windowMs must be a positive whole number/);
  });
});

describe('login rate limiting on every protocol', () => {
  let dataDir: string;
  let server: RepositoryServer;
  let token: string;

  beforeEach(async () => {
    dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-throttle-'));
    token = (await addOwner(dataDir, 'alice')).token;
    await setPassword(dataDir, 'alice', PASSWORD);
    const ftpsPasv = 40_000 + Math.floor(Math.random() * 20_000);
    server = await startRepositoryServer({
      dataDir,
      port: 0,
      sftp: { port: 0 },
      ftps: { port: 0, pasvPorts: { min: ftpsPasv, max: ftpsPasv + 5 } },
      loginThrottle: LIMITS,
    });
  });

  afterEach(async () => {
    await server?.close();
    await fs.rm(dataDir, { recursive: true, force: true });
  });

  async function rateLimitedLines(protocol: string): Promise<Record<string, unknown>[]> {
    const text = await fs.readFile(path.join(dataDir, 'audit.log'), 'utf8');
    return text
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter(
        (e) => e.protocol === protocol && e.result === 'denied' && /rate-limited/.test(String(e.detail)),
      );
  }

  test('HTTP: bad tokens lock the address out with 429 and Retry-After, even for a good token', async () => {
    const status = (t: string): Promise<number> =>
      new RepositoryClient({ url: server.url, token: t }).list('alice').then(
        () => 200,
        (e: unknown) => (e instanceof RepositoryError ? e.status : 0),
      );
    expect(await status(token)).toBe(200);
    for (let i = 0; i < 3; i++) expect(await status(`vsp_wrong${i}`)).toBe(401);
    const res = await fetch(`${server.url}/v1/owners/alice/files`, {
      headers: { authorization: `Bearer ${token}` },
    });
    expect(res.status).toBe(429);
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThan(50);
    expect(((await res.json()) as { error: string }).error).toMatch(/rate-limited: too many failed logins/);
    expect(await rateLimitedLines('http')).toHaveLength(1);
  });

  test('SFTP: wrong passwords lock the address out, for passwords and keys alike', async () => {
    const login = (password: string): Promise<unknown> =>
      SftpTestClient.connect({ port: server.sftp?.port ?? 0, username: 'alice', password }).then(
        (c) => {
          c.end();
          return 'ok';
        },
        (e: unknown) => e,
      );
    for (let i = 0; i < 3; i++)
      expect(String(await login(`wrong password ${i}`))).toMatch(/authentication methods failed/);
    expect(String(await login(PASSWORD))).toMatch(/authentication methods failed/);
    const key = generateEd25519KeyPair('alice@test');
    await addKey(dataDir, 'alice', key.public);
    const byKey = await SftpTestClient.connect({
      port: server.sftp?.port ?? 0,
      username: 'alice',
      privateKey: key.private,
    }).then(
      (c) => c.end(),
      (e: unknown) => e,
    );
    expect(String(byKey)).toMatch(/authentication methods failed/);
    const lines = await rateLimitedLines('sftp');
    expect(lines.length).toBeGreaterThanOrEqual(2);
    expect(lines[0]).toMatchObject({ user: 'alice', action: 'login' });
  });

  test('FTPS: wrong passwords lock the address out with a clear 530', async () => {
    const cert = await fs.readFile(path.join(dataDir, 'ftps_cert.pem'));
    const login = async (password: string): Promise<unknown> => {
      const c = new Client(10_000);
      try {
        await c.access({
          host: '127.0.0.1',
          port: server.ftps?.port,
          user: 'alice',
          password,
          secure: true,
          secureOptions: { ca: cert, checkServerIdentity: () => undefined },
        });
        return 'ok';
      } catch (err) {
        return err;
      } finally {
        c.close();
      }
    };
    for (let i = 0; i < 3; i++) expect(((await login(`wrong password ${i}`)) as FTPError).code).toBe(530);
    const limited = (await login(PASSWORD)) as FTPError;
    expect(limited).toBeInstanceOf(FTPError);
    expect(limited.code).toBe(530);
    expect(limited.message).toMatch(/rate-limited: too many failed logins from 127\.0\.0\.1/);
    expect(await rateLimitedLines('ftps')).toHaveLength(1);
  });
});
