import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { Client as FtpClient } from 'basic-ftp';
import { AccountAdmin } from '../../repository/accounts/admin';
import { openMetadata, type BackendSettings } from '../../repository/store/backend';
import { migratePg, openPgPool } from '../../repository/store/pgMetadata';
import { RepositoryClient, ResumableUploadError } from '../../repository/client';
import { backendEnv, startFleet, type Fleet, type FleetServer } from '../../bench/repositoryFleet';
import { startPostgres, type TestDatabase } from '../support/postgres';
import { startS3, type TestS3 } from '../support/s3';
import { SftpTestClient } from '../support/sftpTestClient';

/**
 * Issue 15's acceptance for many servers: three repository servers behind the balancer, 100 clients
 * uploading at once over HTTP, SFTP and FTPS while one server is killed (SIGKILL, as a crash) and later
 * restarted. Nothing acknowledged may be lost, nothing stored may differ from what was sent, no owner
 * may end over its quota, and resumable uploads caught on a killed server finish through another.
 */

const SERVERS = 3;
const CLIENTS = 100;
const FILES_PER_CLIENT = 3;
const FILE_BYTES = 200 * 1024;
const OWNERS = 10;
/** Each owner's clients try 30 files; the quota lets 25 in, so the quota is contended across servers. */
const QUOTA_FILES = 25;
const RESUMABLE = 6;
const RESUMABLE_BYTES = 1 << 20;
/** Transport failures one file survives (each retry is a new connection, through the balancer). */
const MAX_ATTEMPTS = 40;
/** A client's own timeout for one upload attempt (a dead server's connection may never answer). */
const ATTEMPT_TIMEOUT_MS = 60_000;

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const protocols = ['http', 'sftp', 'ftps'] as const;
type Protocol = (typeof protocols)[number];

let workDir: string;
let fleet: Fleet;
let pg: TestDatabase | undefined;
let s3: TestS3 | undefined;
const owners = Array.from({ length: OWNERS }, (_, i) => ({ name: `owner${i}`, token: '' }));
const resumableOwner = { name: 'bulk', token: '' };
/** For the revocation test: an owner, one of its tokens by id, and an admin token. */
const revoked = { name: 'leaver', token: '', tokenId: 0, adminToken: '' };

beforeAll(async () => {
  workDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-scaleout-'));
  [pg, s3] = await Promise.all([startPostgres(), startS3()]);
  const settings: BackendSettings = { kind: 'cluster', pgUrl: pg.url, s3: s3.settings };
  const pool = openPgPool(pg.url);
  try {
    await migratePg(pool);
  } finally {
    await pool.end();
  }
  const db = await openMetadata(workDir, settings);
  try {
    const admin = new AccountAdmin(db);
    for (const o of [...owners, resumableOwner]) o.token = (await admin.addOwner(o.name)).token;
    for (const o of owners) await admin.setQuota(o.name, { files: QUOTA_FILES });
    await admin.addOwner(revoked.name);
    ({ token: revoked.token, id: revoked.tokenId } = await admin.createToken(revoked.name, 'to revoke'));
    revoked.adminToken = (await admin.createAdminToken('scaleout test')).token;
  } finally {
    await db.close();
  }
  fleet = await startFleet({
    servers: SERVERS,
    workDir,
    serviceToken: randomBytes(24).toString('base64url'),
    env: () => backendEnv(settings),
  });
});

afterAll(async () => {
  await fleet?.close();
  await s3?.stop();
  await pg?.stop();
  await fs.rm(workDir, { recursive: true, force: true });
});

/**
 * One upload over a fresh connection through the balancer. `signal` (the client's own timeout) closes
 * the connection: a client whose server vanished mid-transfer must not wait on it for ever.
 */
async function uploadOnce(
  protocol: Protocol,
  owner: (typeof owners)[0],
  name: string,
  data: Buffer,
  signal: AbortSignal,
): Promise<void> {
  switch (protocol) {
    case 'http': {
      const client = new RepositoryClient({ url: fleet.url, token: owner.token });
      const info = await client.upload(owner.name, name, Readable.from([data]), {
        sha256: sha(data),
        size: data.length,
        signal,
      });
      if (info.sha256 !== sha(data)) throw new Error(`${name}: the server stored ${info.sha256}`);
      return;
    }
    case 'sftp': {
      // An API token is accepted as the password (no argon2 work per login: 60 clients log in at once).
      const c = await SftpTestClient.connect({
        port: fleet.sftpPort,
        username: owner.name,
        password: owner.token,
      });
      const stop = (): void => {
        c.conn.destroy();
      };
      signal.addEventListener('abort', stop);
      try {
        await c.writeFile(`/${name}`, data);
      } finally {
        signal.removeEventListener('abort', stop);
        c.end();
      }
      return;
    }
    case 'ftps': {
      const c = new FtpClient(30_000);
      const stop = (): void => c.close();
      signal.addEventListener('abort', stop);
      try {
        await c.access({
          host: '127.0.0.1',
          port: fleet.ftpsPort,
          user: owner.name,
          password: owner.token,
          secure: true,
          secureOptions: { ca: fleet.ftpsCert, checkServerIdentity: () => undefined },
        });
        await c.uploadFrom(Readable.from([data]), name);
      } finally {
        signal.removeEventListener('abort', stop);
        c.close();
      }
    }
  }
}

interface Outcome {
  owner: string;
  name: string;
  sha256: string;
  result: 'stored' | 'over-quota';
  attempts: number;
}

test('100 clients over three protocols lose nothing while a server is killed and restarted', async () => {
  const total = CLIENTS * FILES_PER_CLIENT;
  const victim: FleetServer = fleet.servers[1];
  let finished = 0;
  let inFlight = 0;
  let inFlightAtKill = -1;
  let transportFailures = 0;
  let timedOut = 0;
  const milestones: { at: number; resolve: () => void }[] = [];
  const reached = (at: number): Promise<void> => new Promise((resolve) => milestones.push({ at, resolve }));
  const afterEach = (): void => {
    finished++;
    for (const m of milestones.filter((x) => x.at <= finished)) m.resolve();
  };

  const clientRuns = Array.from({ length: CLIENTS }, async (_, c): Promise<Outcome[]> => {
    const protocol = protocols[c % protocols.length];
    const owner = owners[c % OWNERS];
    const out: Outcome[] = [];
    for (let f = 0; f < FILES_PER_CLIENT; f++) {
      const name = `${protocol}-${c}-${f}.bin`;
      const data = randomBytes(FILE_BYTES);
      let attempts = 0;
      for (;;) {
        attempts++;
        inFlight++;
        try {
          const stop = new AbortController();
          const attempt = uploadOnce(protocol, owner, name, data, stop.signal);
          // Settled late when the timeout wins the race: nothing to report then.
          attempt.catch(() => undefined);
          let timer: NodeJS.Timeout | undefined;
          try {
            await Promise.race([
              attempt,
              new Promise((_, reject) => {
                timer = setTimeout(() => {
                  timedOut++;
                  stop.abort();
                  reject(new Error(`${name}: no answer in ${ATTEMPT_TIMEOUT_MS / 1000} s`));
                }, ATTEMPT_TIMEOUT_MS);
              }),
            ]);
          } finally {
            clearTimeout(timer);
          }
          out.push({ owner: owner.name, name, sha256: sha(data), result: 'stored', attempts });
          break;
        } catch (err) {
          const message = err instanceof Error ? err.message : String(err);
          if (/quota/i.test(message)) {
            out.push({ owner: owner.name, name, sha256: sha(data), result: 'over-quota', attempts });
            break;
          }
          transportFailures++;
          if (attempts >= MAX_ATTEMPTS) throw new Error(`${name}: ${attempts} attempts failed: ${message}`);
          // A client's backoff, not a wait for the servers: the balancer routes the retry to a live one.
          await new Promise((r) => setTimeout(r, Math.min(1000, 50 * attempts)));
        } finally {
          inFlight--;
        }
      }
      afterEach();
    }
    return out;
  });

  // The chaos, driven by progress: kill a third of the way in, restart two thirds of the way in.
  const chaos = (async () => {
    await reached(Math.floor(total / 3));
    inFlightAtKill = inFlight;
    await victim.kill();
    await reached(Math.floor((2 * total) / 3));
    await victim.restart();
  })();

  const outcomes = (await Promise.all(clientRuns)).flat();
  await chaos;

  expect(inFlightAtKill).toBeGreaterThan(0);
  expect(outcomes).toHaveLength(total);

  // Every acknowledged file is there, byte for byte; nothing else is; no owner is over its quota.
  const mismatches: string[] = [];
  for (const owner of owners) {
    const client = new RepositoryClient({ url: fleet.url, token: owner.token });
    const listed = new Map((await client.list(owner.name)).map((f) => [f.path, f.sha256]));
    const mine = outcomes.filter((o) => o.owner === owner.name);
    const stored = mine.filter((o) => o.result === 'stored');
    expect(listed.size).toBe(stored.length);
    expect(listed.size).toBeLessThanOrEqual(QUOTA_FILES);
    for (const o of stored) {
      if (listed.get(o.name) !== o.sha256)
        mismatches.push(`${owner.name}/${o.name}: listed ${listed.get(o.name)}`);
      const hash = createHash('sha256');
      const got = await client.downloadStream(owner.name, o.name);
      for await (const chunk of got) hash.update(chunk as Buffer);
      if (hash.digest('hex') !== o.sha256) mismatches.push(`${owner.name}/${o.name}: bytes differ`);
    }
  }
  expect(mismatches).toEqual([]);
  const overQuota = outcomes.filter((o) => o.result === 'over-quota').length;
  expect(overQuota).toBeGreaterThanOrEqual(OWNERS * (FILES_PER_CLIENT * (CLIENTS / OWNERS) - QUOTA_FILES));
  // The restarted server is back in the balancer's rotation.
  expect(await new RepositoryClient({ url: victim.url, token: owners[0].token }).health()).toBe(true);
  console.log(
    JSON.stringify({
      transportFailures,
      timedOut,
      inFlightAtKill,
      overQuota,
      connectionsPerServer: fleet.servers.map((sv) =>
        [...fleet.balancer.accepted]
          .filter(([k]) => k.startsWith(`${sv.host}:`))
          .reduce((n, [, v]) => n + v, 0),
      ),
    }),
  );
});

test('in-flight resumable uploads resume on another server when theirs is killed', async () => {
  const victim = fleet.servers[2];
  const dir = path.join(workDir, 'resumable');
  await fs.mkdir(dir, { recursive: true });
  // Started on the victim directly, each stopped once its first chunk is acknowledged.
  const resumables = await Promise.all(
    Array.from({ length: RESUMABLE }, async (_, i) => {
      const r = {
        name: `resumable-${i}.bin`,
        file: path.join(dir, `resumable-${i}.bin`),
        data: randomBytes(RESUMABLE_BYTES),
      };
      await fs.writeFile(r.file, r.data);
      return r;
    }),
  );
  const direct = new RepositoryClient({ url: victim.url, token: resumableOwner.token });
  const uploadIds: string[] = [];
  for (const r of resumables) {
    const stop = new AbortController();
    const err = await direct
      .uploadResumable(resumableOwner.name, r.name, r.file, {
        chunkBytes: 128 * 1024,
        signal: stop.signal,
        onProgress: (stored) => stop.abort(new Error(`stopped at ${stored}`)),
      })
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    expect(err).toBeInstanceOf(ResumableUploadError);
    uploadIds.push((err as ResumableUploadError).uploadId ?? '');
  }
  expect(uploadIds).not.toContain('');
  await victim.kill();
  try {
    // Through the balancer: with the victim down, on one of the others.
    const client = new RepositoryClient({ url: fleet.url, token: resumableOwner.token });
    const infos = await Promise.all(
      resumables.map((r, i) =>
        client.uploadResumable(resumableOwner.name, r.name, r.file, {
          uploadId: uploadIds[i],
          chunkBytes: 128 * 1024,
        }),
      ),
    );
    for (const [i, info] of infos.entries()) expect(info.sha256).toBe(sha(resumables[i].data));
  } finally {
    await victim.restart();
  }
});

test('a revocation or a lockout on one server holds on every server at once', async () => {
  const [a, b, c] = fleet.servers;
  const sftpLogin = (password: string, username = revoked.name): Promise<SftpTestClient> =>
    SftpTestClient.connect({ host: c.host, port: c.ports.sftp, username, password });
  const refused = (p: Promise<unknown>): Promise<string> =>
    p.then(
      () => 'accepted',
      (e: unknown) => String(e),
    );
  expect(await new RepositoryClient({ url: b.url, token: revoked.token }).list(revoked.name)).toEqual([]);
  const session = await sftpLogin(revoked.token);
  try {
    expect((await session.readdir('/')).map((e) => e.filename)).toEqual(['base-images']);
    const res = await fetch(`${a.url}/v1/admin/tokens/${revoked.tokenId}`, {
      method: 'DELETE',
      headers: { authorization: `Bearer ${revoked.adminToken}` },
    });
    expect(res.status).toBe(204);
    // Refused on the other servers at once: a new request, a new login, and the open session's next call.
    expect(
      await refused(new RepositoryClient({ url: b.url, token: revoked.token }).list(revoked.name)),
    ).toMatch(/revoked/);
    expect(await refused(sftpLogin(revoked.token))).toMatch(/authentication methods failed/);
    expect(await refused(session.readdir('/'))).not.toBe('accepted');
  } finally {
    session.end();
  }

  // Failed logins on one server lock the address out on the others (10 per address by default). Last in
  // this file: from here on, every login from 127.0.0.1 is refused.
  // The revoked token's refusals above count too: fewer than ten more failures may do.
  const failures: string[] = [];
  for (let i = 0; i < 10 && !/rate-limited/.test(failures.at(-1) ?? ''); i++)
    failures.push(
      await refused(new RepositoryClient({ url: a.url, token: `vsp_wrong${i}` }).list(owners[0].name)),
    );
  expect(failures[0]).toMatch(/invalid access token/);
  expect(
    await refused(new RepositoryClient({ url: b.url, token: owners[0].token }).list(owners[0].name)),
  ).toMatch(/rate-limited: too many failed logins from 127\.0\.0\.1/);
  expect(await refused(sftpLogin(owners[0].token, owners[0].name))).toMatch(/authentication methods failed/);
});
