import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { addOwner } from '../../repository/accounts/admin';
import { RepositoryClient } from '../../repository/client';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';
import {
  downloadInputs,
  INPUT_DOWNLOADS_AT_ONCE,
  InputNotFound,
  inputSizes,
  type InputProgress,
} from '../../storage/inputDownloads';

/**
 * A task's inputs downloaded several at once from a real repository: every byte checked, progress
 * counted over all of them, an earlier attempt's verified copy kept, and a missing input stopping the
 * rest without leaving partial files.
 */
let dataDir: string;
let work: string;
let server: RepositoryServer;
let client: RepositoryClient;
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
/** More inputs than downloads at once, of sizes from empty to a few MiB. */
const inputs = Array.from({ length: INPUT_DOWNLOADS_AT_ONCE * 3 }, (_, i) => ({
  path: `in/d${i % 3}/f${i}.bin`,
  bytes: randomBytes(i % 5 === 0 ? 0 : (i * 131_071) % (3 << 20)),
}));
const files = inputs.map((i) => ({ path: i.path, size: i.bytes.length }));

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-inputs-repo-'));
  const { token } = await addOwner(dataDir, 'alice');
  server = await startRepositoryServer({ dataDir, port: 0 });
  client = new RepositoryClient({ url: server.url, token });
  for (const i of inputs) await client.upload('alice', i.path, Readable.from([i.bytes]));
});

afterAll(async () => {
  await server?.close();
  if (dataDir) await fs.rm(dataDir, { recursive: true, force: true });
});

beforeEach(async () => {
  work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-inputs-'));
});

afterEach(async () => {
  await fs.rm(work, { recursive: true, force: true });
});

/** Every file under `dir`, relative, sorted. */
async function listed(dir: string): Promise<string[]> {
  const entries = await fs.readdir(dir, { recursive: true, withFileTypes: true });
  return entries
    .filter((e) => e.isFile())
    .map((e) => path.relative(dir, path.join(e.parentPath, e.name)))
    .sort();
}

test('all inputs land with their bytes, verified, and progress counts them all', async () => {
  const verified: Record<string, string> = {};
  const progress: InputProgress[] = [];
  const milestones: number[] = [];
  const result = await downloadInputs(client, 'alice', work, {
    files,
    verified,
    sync: false,
    onProgress: (p) => progress.push(p),
    onVerified: (v) => milestones.push(Object.keys(v).length),
  });
  expect(result).toEqual({ downloaded: inputs.length, kept: 0 });
  for (const i of inputs) {
    expect(sha256(await fs.readFile(path.join(work, i.path)))).toBe(sha256(i.bytes));
    expect(verified[i.path]).toBe(sha256(i.bytes));
  }
  expect(await listed(work)).toEqual(inputs.map((i) => i.path).sort());
  const total = inputs.reduce((n, i) => n + i.bytes.length, 0);
  expect(progress.at(-1)).toEqual({ done: inputs.length, of: inputs.length, bytes: total, total });
  // Never more than the whole; each milestone one more verified input.
  expect(Math.max(...progress.map((p) => p.bytes))).toBe(total);
  expect(milestones).toEqual(inputs.map((_, n) => n + 1));
});

test("a retry keeps an earlier attempt's verified copy and replaces a copy that differs", async () => {
  const [good, bad] = [inputs[1], inputs[2]];
  for (const i of [good, bad]) await fs.mkdir(path.dirname(path.join(work, i.path)), { recursive: true });
  await fs.writeFile(path.join(work, good.path), good.bytes);
  await fs.writeFile(path.join(work, bad.path), Buffer.alloc(bad.bytes.length, 1));
  const { ino } = await fs.stat(path.join(work, good.path));
  const verified = { [good.path]: sha256(good.bytes) };
  const result = await downloadInputs(client, 'alice', work, {
    files: files.slice(0, 4),
    verified,
    sync: true,
  });
  expect(result).toEqual({ downloaded: 3, kept: 1 });
  expect((await fs.stat(path.join(work, good.path))).ino).toBe(ino);
  expect(sha256(await fs.readFile(path.join(work, bad.path)))).toBe(sha256(bad.bytes));
});

test('a missing input fails the stage-in by its name; the other downloads stop, leaving no partial file', async () => {
  const missing = { path: 'in/gone.bin', size: 10 };
  const withMissing = [...files.slice(0, 3), missing, ...files.slice(3)];
  const err = await downloadInputs(client, 'alice', work, {
    files: withMissing,
    verified: {},
    sync: false,
  }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(InputNotFound);
  expect((err as InputNotFound).input).toBe('in/gone.bin');
  expect((err as Error).message).toBe("input file 'in/gone.bin' is not in alice's repository space");
  // Each input either complete under its name or not there at all (a download cut off is removed).
  for (const f of await listed(work)) {
    const i = inputs.find((x) => x.path === f);
    expect(i && sha256(await fs.readFile(path.join(work, f)))).toBe(i && sha256(i.bytes));
  }
});

test('sizes come back in input order, and the first missing input in that order is named', async () => {
  expect(await inputSizes(client, 'alice', files.map((f) => f.path).reverse())).toEqual([...files].reverse());
  const names = files.map((f) => f.path);
  const err = await inputSizes(client, 'alice', [
    ...names.slice(0, 9),
    'in/first-gone.bin',
    ...names.slice(9),
    'in/second-gone.bin',
  ]).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(InputNotFound);
  expect((err as InputNotFound).input).toBe('in/first-gone.bin');
});
