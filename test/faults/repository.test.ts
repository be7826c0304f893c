import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { ResumableUploadError } from '../../repository/client';
import { withAdmin } from '../../repository/accounts/admin';
import { FaultCluster, OWNER, poll, recordFigure, sha256 } from '../support/faultCluster';

/**
 * The repository under faults (issue 10, Acceptance): down during a task's stage-out, restarted during a
 * resumable upload, hit by aborted uploads and oversized bodies while another client keeps working. (The
 * full store is storeFull.test.ts.)
 */
/**
 * How long the repository stays down during stage-out. The issue asks for 5 minutes; the suite's time
 * budget takes 30 s by default, which the workflow cannot tell from 5 minutes: it waits in its visible
 * `awaiting-repository` phase for as long as the outage lasts (VSP_FAULT_REPO_OUTAGE_SEC=300 for the
 * full figure).
 */
const OUTAGE_MS = Number(process.env.VSP_FAULT_REPO_OUTAGE_SEC ?? 30) * 1000;

let fc: FaultCluster;

beforeAll(async () => {
  fc = await FaultCluster.start({ hosts: ['a'] });
}, 180_000);

afterAll(async () => {
  await fc?.stop();
});

// A test that fails while the repository is down (or felled it) must not take the next tests with it.
afterEach(async () => {
  if (!fc || (fc.cluster.repositoryPid !== undefined && (await fc.repo().health()))) return;
  if (fc.cluster.repositoryPid !== undefined) await fc.cluster.stopRepository('SIGKILL');
  await fc.cluster.startRepository();
});

/** The repository's HTTP address, for raw sockets. */
function repoAddress(): { host: string; port: number } {
  const u = new URL(fc.cluster.repositoryUrl);
  return { host: u.hostname, port: Number(u.port) };
}

test('repository down during stage-out: the task waits, every output arrives after it returns, completed', async () => {
  const name = 'repo-outage';
  const files = Array.from({ length: 5 }, (_, i) => ({ name: `f${i}.bin`, data: randomBytes(256 << 10) }));
  const writes = files.map((f) => `head -c ${f.data.length} in/${f.name} > out/${f.name}`);
  await Promise.all(files.map((f) => fc.upload(`in/${f.name}`, f.data)));
  // Three tries of stage-out, then the wait in `awaiting-repository`, trying every 5 s (defaults: 20 tries,
  // then every 60 s): the same path, in a time the suite can afford.
  const taskId = await fc.submitTuned(
    'repo-outage',
    {
      host: 'a',
      inputs: files.map((f) => `in/${f.name}`),
      command: [fc.taskCommand(name, false), ...writes].join(' && '),
    },
    { hostStepAttempts: 3, repositoryRetrySec: 5 },
  );
  const hold = await fc.hold(taskId, 'stageOut', 'before');
  await hold.held();
  await fc.cluster.stopRepository('SIGKILL');
  const down = Date.now();
  await hold.release();

  const waiting = await fc.untilStatus(taskId, 'to await the repository', (s) =>
    ['awaiting-repository', 'failed', 'completed'].includes(s.phase),
  );
  expect(waiting.phase).toBe('awaiting-repository');
  recordFigure(
    'repository outage: time until the task showed awaiting-repository',
    (Date.now() - down) / 1000,
    's',
  );
  // Throughout the outage the task keeps waiting, its outputs on the host.
  await poll(`an outage of ${OUTAGE_MS / 1000} s`, OUTAGE_MS + 60_000, async () => {
    expect((await fc.status(taskId)).phase).toBe('awaiting-repository');
    return Date.now() - down >= OUTAGE_MS || undefined;
  });
  expect(await fc.storeLeftovers()).not.toEqual([]);
  await fc.cluster.startRepository();
  const back = Date.now();
  recordFigure('repository outage during stage-out', (back - down) / 1000, 's');

  const result = await fc.vsp.result(taskId);
  recordFigure(
    'repository outage: completion after the repository returned',
    (Date.now() - back) / 1000,
    's',
  );
  const outputs = Object.fromEntries(
    result.outputs.map((o) => [o.path.slice(result.resultsPath.length + 1), o.sha256]),
  );
  const expected = Object.fromEntries([
    ...files.map((f) => [`outputs/${f.name}`, sha256(f.data)]),
    ['outputs/runs.txt', sha256('run\n')],
    ['outputs/id.txt', sha256(`${name}\n`)],
  ]);
  expect(outputs).toEqual(expected);
  let kept = 0;
  for (const o of result.outputs) if (sha256(await fc.download(o.path)) === o.sha256) kept++;
  recordFigure('repository outage: outputs kept', `${kept} of ${Object.keys(expected).length}`);
  expect(kept).toBe(Object.keys(expected).length);
  expect(await fc.storeLeftovers()).toEqual([]);
}, 600_000);

test('repository SIGKILLed during a resumable upload and restarted: the resume completes with the right checksum', async () => {
  const data = randomBytes(8 << 20);
  const file = path.join(fc.dir, 'resumable.bin');
  await fs.writeFile(file, data);
  let killing: Promise<void> | undefined;
  const err = await fc
    .repo()
    .uploadResumable(OWNER, 'in/resumable.bin', file, {
      chunkBytes: 512 << 10,
      retries: 0,
      onProgress: (stored) => {
        if (stored >= data.length / 2 && !killing) killing = fc.cluster.stopRepository('SIGKILL');
      },
    })
    .catch((e: unknown) => e);
  await killing;
  expect(err).toBeInstanceOf(ResumableUploadError);
  const uploadId = (err as ResumableUploadError).uploadId;
  expect(uploadId).toBeDefined();

  await fc.cluster.startRepository();
  expect(await fc.repo().stat(OWNER, 'in/resumable.bin')).toBeUndefined();
  const stored: number[] = [];
  const info = await fc.repo().uploadResumable(OWNER, 'in/resumable.bin', file, {
    uploadId,
    chunkBytes: 1 << 20,
    onProgress: (n) => stored.push(n),
  });
  expect(info).toMatchObject({ size: data.length, sha256: sha256(data) });
  // The session kept what it had before the kill: the resume did not start over.
  expect(stored[0]).toBeGreaterThanOrEqual(data.length / 2);
  expect(sha256(await fc.download('in/resumable.bin'))).toBe(sha256(data));
}, 120_000);

interface RawReply {
  status?: number;
  ms: number;
}

/**
 * Sends `head` and the first bytes of a body that announced more, then ends the connection the way asked:
 * `reset` (RST), `half-close` (FIN, then waits for an answer or the close). Resolves with the answer, if any.
 */
function rawAbortedUpload(head: string, sent: Buffer, how: 'reset' | 'half-close'): Promise<RawReply> {
  const started = Date.now();
  return new Promise((resolve) => {
    const socket = net.connect(repoAddress());
    let answer = '';
    const done = () => {
      const m = /^HTTP\/1\.1 (\d{3})/.exec(answer);
      resolve({ status: m ? Number(m[1]) : undefined, ms: Date.now() - started });
    };
    socket.on('data', (c: Buffer) => (answer += c.toString('latin1')));
    socket.on('close', done);
    socket.on('error', () => undefined);
    socket.setTimeout(30_000, () => socket.destroy());
    socket.on('connect', () => {
      socket.write(head);
      socket.write(sent, () => {
        if (how === 'reset') socket.resetAndDestroy();
        else socket.end();
      });
    });
  });
}

/** A request with a JSON body of `bytes` bytes; resolves with its status and how long the answer took. */
function bigJson(method: string, apiPath: string, token: string, bytes: number): Promise<RawReply> {
  const body = JSON.stringify({ pad: 'x'.repeat(bytes) });
  const head =
    `${method} ${apiPath} HTTP/1.1\r\nHost: repo\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n`;
  const started = Date.now();
  return new Promise((resolve) => {
    const socket = net.connect(repoAddress());
    let answer = '';
    socket.on('data', (c: Buffer) => {
      answer += c.toString('latin1');
      // The status line is the answer: a server that refuses the body need not read it.
      const m = /^HTTP\/1\.1 (\d{3})/.exec(answer);
      if (m) {
        resolve({ status: Number(m[1]), ms: Date.now() - started });
        socket.destroy();
      }
    });
    socket.on('error', () => undefined);
    socket.on('close', () => resolve({ ms: Date.now() - started }));
    socket.setTimeout(30_000, () => socket.destroy());
    socket.on('connect', () => {
      socket.write(head);
      socket.write(body);
    });
  });
}

test('aborted uploads and oversized bodies: the repository answers at once and keeps serving another client', async () => {
  const token = fc.cluster.ownerTokens.get(OWNER) ?? '';
  const admin = (await withAdmin(fc.cluster.repoDir, (a) => a.createAdminToken('faults'))).token;
  const pid = fc.cluster.repositoryPid;

  // Another client uploads and reads back a file, over and over, for as long as the attacks last.
  let attacking = true;
  const bystander = (async () => {
    let rounds = 0;
    const failures: string[] = [];
    while (attacking || rounds < 3) {
      const data = randomBytes(64 << 10);
      try {
        await fc.upload(`bystander/r${rounds}.bin`, data);
        if (sha256(await fc.download(`bystander/r${rounds}.bin`)) !== sha256(data))
          failures.push(`round ${rounds}: wrong bytes back`);
      } catch (err) {
        failures.push(`round ${rounds}: ${(err as Error).message}`);
      }
      rounds++;
    }
    return { rounds, failures };
  })();

  /** After each attack the same repository process still answers, or the test says which attack felled it. */
  const serving = async (after: string) => {
    const healthy = await fc.repo().health();
    expect({ after, healthy, pid: fc.cluster.repositoryPid }).toEqual({ after, healthy: true, pid });
  };
  const put = (p: string) =>
    `PUT /v1/owners/${OWNER}/files/${p} HTTP/1.1\r\nHost: repo\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n`;
  const ten = Buffer.alloc(10, 1);
  await rawAbortedUpload(put('aborted/reset.bin'), ten, 'reset');
  await serving('a PUT reset after 10 of 1000 bytes');
  const halfClosed = await rawAbortedUpload(put('aborted/half.bin'), ten, 'half-close');
  await serving('a PUT half-closed after 10 of 1000 bytes');
  const session = JSON.stringify({
    path: 'aborted/resumable.bin',
    size: 1000,
    sha256: sha256(Buffer.alloc(1000)),
  });
  const started = await fetch(`${fc.cluster.repositoryUrl}/v1/owners/${OWNER}/uploads`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: session,
  });
  expect(started.status).toBe(201);
  const { id } = (await started.json()) as { id: string };
  await rawAbortedUpload(
    `PATCH /v1/owners/${OWNER}/uploads/${id} HTTP/1.1\r\nHost: repo\r\nAuthorization: Bearer ${token}\r\n` +
      `Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: 1000\r\n\r\n`,
    ten,
    'reset',
  );
  await serving('a resumable PATCH reset after 10 of 1000 bytes');

  const big = 80 << 10;
  const refusals = [
    ['uploads', await bigJson('POST', `/v1/owners/${OWNER}/uploads`, token, big)],
    ['tasks', await bigJson('POST', `/v1/owners/${OWNER}/tasks`, token, big)],
    ['admin owners', await bigJson('POST', '/v1/admin/owners', admin, big)],
  ] as const;
  await serving('JSON bodies of 80 KiB');
  attacking = false;
  const { rounds, failures } = await bystander;

  for (const [what, r] of refusals) {
    expect({ what, status: r.status }).toEqual({ what, status: 413 });
    expect(r.ms).toBeLessThan(5000);
  }
  // The half-closed upload got an answer (an error: its body was short) rather than a hang.
  expect(halfClosed.status).toBeGreaterThanOrEqual(400);
  expect(failures).toEqual([]);
  expect(rounds).toBeGreaterThanOrEqual(3);
  // Nothing of an aborted upload is visible.
  expect(await fc.repo().list(OWNER, 'aborted/')).toEqual([]);
}, 120_000);
