import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { consoleText, LiveLogShipper } from '../../activities/host/liveLog';
import { RepositoryError } from '../../repository/client';
import { LiveLogs } from '../../repository/tasks/liveLogs';
import { liveLogStoreCases } from '../support/liveLogStoreCases';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-livelogs-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

const CAP = 'cap12345';
const text = async (logs: LiveLogs, offset = 0) => (await logs.read('alice', CAP, offset)).toString();

liveLogStoreCases('files', (maxBytes) => LiveLogs.open(dir, maxBytes));

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
