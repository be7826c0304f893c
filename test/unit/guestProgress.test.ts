import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { waitForGuest, type GuestWatch } from '../../drivers/guestWait';
import { createLogger } from '../../logging/logger';

let dir: string;
beforeEach(async () => (dir = await mkdtemp(path.join(os.tmpdir(), 'vsp-guest-progress-'))));
afterEach(() => rm(dir, { recursive: true, force: true }));

/** A guest that already wrote its whole console and powered off before the first poll. */
function endedGuest(consoleLog: string): GuestWatch {
  return {
    vmId: 'vm-1',
    hostName: 'a',
    consoleLog,
    deadline: NaN,
    pollMs: 10,
    log: createLogger('test'),
    probe: async () => ({ exists: false, running: false, endedWhy: 'powered off', details: {} }),
    waitGone: async () => true,
    stop: async () => undefined,
    migratedAway: async () => undefined,
  };
}

test('a guest that reported progress and exited between two polls: its last report is in the result', async () => {
  const consoleLog = path.join(dir, 'console.log');
  // Kernel lines interleave; CRLF from the serial port; the same line format as the process driver's.
  await writeFile(
    consoleLog,
    '[    0.1] booting\r\nVSP-START\r\nVSP-PROGRESS 10\r\nVSP-PROGRESS 80 encoding\r\nVSP-PROGRESS 99.5  nearly\r\nVSP-PROGRESS 100 done\r\nVSP-EXIT 0\r\n',
  );
  const seen: unknown[] = [];
  const result = await waitForGuest(endedGuest(consoleLog), {
    signal: new AbortController().signal,
    onProgress: (s) => seen.push(s),
  });
  expect(result).toEqual({ exitCode: 0, timedOut: false, progress: 100, progressMessage: 'done' });
  expect(seen).toEqual([]);
});
