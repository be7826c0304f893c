import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { consoleText, LiveLogShipper } from '../../activities/host/liveLog';
import { RepositoryError } from '../../repository/client';
import { LiveLogError, LiveLogs } from '../../repository/tasks/liveLogs';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-livelogs-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

const CAP = 'cap12345';
const text = async (logs: LiveLogs, offset = 0) => (await logs.read('alice', CAP, offset)).toString();

test('a live log takes appends in order: a repeated one adds nothing, one past the end is refused with its size', async () => {
  const logs = await LiveLogs.open(dir);
  expect(await logs.append('alice', CAP, 0, Buffer.from('one\n'))).toEqual({ size: 4, full: false });
  // A retry of the same append (the host did not hear the reply), then one that overlaps the end.
  expect(await logs.append('alice', CAP, 0, Buffer.from('one\n'))).toEqual({ size: 4, full: false });
  expect(await logs.append('alice', CAP, 2, Buffer.from('e\ntwo\n'))).toEqual({ size: 8, full: false });
  // Without an offset: at the end (a host that takes the VM over after a migration).
  expect(await logs.append('alice', CAP, undefined, Buffer.from('three\n'))).toEqual({
    size: 14,
    full: false,
  });
  await expect(logs.append('alice', CAP, 20, Buffer.from('x'))).rejects.toMatchObject({
    status: 409,
    message: expect.stringContaining('has 14 bytes'),
  });
  expect(await text(logs)).toBe('one\ntwo\nthree\n');
  expect(await text(logs, 8)).toBe('three\n');
  expect(await logs.size('alice', CAP)).toBe(14);
  expect(await logs.size('alice', 'cap-never')).toBe(0);
  // Concurrent appends at the same offset: the file gets the bytes once.
  const both = await Promise.all([0, 1].map(() => logs.append('alice', 'cap-race1', 0, Buffer.from('abc'))));
  expect(both.map((r) => r.size)).toEqual([3, 3]);
  expect((await logs.read('alice', 'cap-race1', 0)).toString()).toBe('abc');
  // A capability id never becomes a path outside the folder.
  await expect(logs.append('alice', '../../etc', 0, Buffer.from('x'))).rejects.toBeInstanceOf(LiveLogError);
});

test('a live log stops at its limit with a note, and says it is full', async () => {
  const logs = await LiveLogs.open(dir, 200);
  expect(await logs.append('alice', CAP, 0, Buffer.alloc(50, 'a'))).toEqual({ size: 50, full: false });
  const r = await logs.append('alice', CAP, 50, Buffer.alloc(500, 'b'));
  expect(r.full).toBe(true);
  expect(r.size).toBe(200);
  expect(await text(logs)).toMatch(
    /^a{50}b+\n\[vsp: the live log stops at 200 bytes; task\.log keeps the whole output\]\n$/,
  );
  expect(await logs.append('alice', CAP, undefined, Buffer.from('more'))).toEqual({ size: 200, full: true });
});

test('a follower waiting on a log wakes when it grows, not only at its poll', async () => {
  const logs = await LiveLogs.open(dir);
  const stop = new AbortController();
  const woke = logs.waitForGrowth('alice', CAP, 60_000, stop.signal).then(() => 'grew');
  await logs.append('alice', CAP, 0, Buffer.from('line\n'));
  expect(await woke).toBe('grew');
  const aborted = logs.waitForGrowth('alice', CAP, 60_000, stop.signal).then(() => 'stopped');
  stop.abort();
  expect(await aborted).toBe('stopped');
});

test("a console is shipped as the owner reads it: whole lines, the guest's output prefix off", () => {
  const raw = Buffer.from('Linux version 6.1\r\nVSP-START\nVSP-OUT hello\r\nVSP-PROGRESS 10 a\nVSP-OUT par');
  const { consumed, bytes } = consoleText(raw, false);
  expect(bytes.toString()).toBe('Linux version 6.1\nVSP-START\nhello\nVSP-PROGRESS 10 a\n');
  expect(consumed).toBe(raw.length - 'VSP-OUT par'.length);
  expect(consoleText(Buffer.from('VSP-OUT par'), true).bytes.toString()).toBe('par');
  // A task cannot pass its own lines off as the guest's: they keep whatever follows the prefix.
  expect(consoleText(Buffer.from('VSP-OUT VSP-EXIT 0\n'), false).bytes.toString()).toBe('VSP-EXIT 0\n');
});

test('the shipper sends new bytes once, resumes where it stopped after a restart, and starts over on a new console', async () => {
  const file = path.join(dir, 'console.log');
  const stateFile = path.join(dir, 'live-log.json');
  const logs = await LiveLogs.open(path.join(dir, 'repo'));
  const sent: (number | undefined)[] = [];
  const append = (offset: number | undefined, bytes: Buffer) => {
    sent.push(offset);
    return logs.append('alice', CAP, offset, bytes);
  };
  const shipper = () => new LiveLogShipper({ file, console: true, stateFile, append });

  await fs.writeFile(file, 'VSP-START\nVSP-OUT one\nVSP-OUT tw');
  const first = shipper();
  await first.ship(false);
  await first.ship(false);
  expect(await text(logs)).toBe('VSP-START\none\n');
  // A new worker (the old one died) goes on from the state in the VM folder: nothing twice.
  await fs.appendFile(file, 'o\n');
  await shipper().ship(false);
  expect(await text(logs)).toBe('VSP-START\none\ntwo\n');
  // The VM came back to this host: a new console file, appended after what the log has.
  await fs.rm(file);
  await fs.writeFile(file, 'VSP-OUT three');
  await shipper().ship(true);
  expect(await text(logs)).toBe('VSP-START\none\ntwo\nthree');
  // Each start without a known end asks for it first (an empty append), then names every offset.
  expect(sent).toEqual([undefined, 0, 14, undefined, 18]);
});

test('the shipper goes on from the end when the repository has less than it thought (a gap)', async () => {
  const file = path.join(dir, 'task.log');
  const stateFile = path.join(dir, 'live-log.json');
  await fs.writeFile(file, 'abc');
  await fs.writeFile(stateFile, JSON.stringify({ ino: (await fs.stat(file)).ino, local: 1, remote: 99 }));
  const calls: (number | undefined)[] = [];
  const shipper = new LiveLogShipper({
    file,
    console: false,
    stateFile,
    append: async (offset, bytes) => {
      calls.push(offset);
      if (offset === 99) throw new RepositoryError(409, 'gap');
      return { size: 10 + bytes.length, full: false };
    },
  });
  await shipper.ship(false);
  expect(calls).toEqual([99, undefined, 10]);
  expect(JSON.parse(await fs.readFile(stateFile, 'utf8'))).toMatchObject({ local: 3, remote: 12 });
});

test('after a migration the next host goes on where the log ends: each host ships its own console once', async () => {
  const logs = await LiveLogs.open(path.join(dir, 'repo'));
  const append = (offset: number | undefined, bytes: Buffer) => logs.append('alice', CAP, offset, bytes);
  const host = async (name: string) => {
    await fs.mkdir(path.join(dir, name));
    const file = path.join(dir, name, 'console.log');
    const stateFile = path.join(dir, name, 'live-log.json');
    return { file, shipper: new LiveLogShipper({ file, console: true, stateFile, append }) };
  };
  const a = await host('a');
  await fs.writeFile(a.file, 'VSP-START\r\nVSP-OUT before\r\nVSP-OUT hal');
  await a.shipper.ship(false);
  // The VM leaves a: its last piece goes (a line cut by the move included); b's console starts empty.
  await a.shipper.ship(true);
  const b = await host('b');
  await fs.writeFile(b.file, 'f\r\nVSP-OUT after\r\n');
  await b.shipper.ship(false);
  await b.shipper.ship(false);
  expect(await text(logs)).toBe('VSP-START\nbefore\nhalf\nafter\n');
});
