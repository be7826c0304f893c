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

test("a guest's exit is seen when it is written, not a poll period later", async () => {
  const consoleLog = path.join(dir, 'console.log');
  await writeFile(consoleLog, 'VSP-START\r\n');
  let running = true;
  // A poll period far past the test's timeout: only the console's change can end the wait in time.
  const guest: GuestWatch = {
    ...endedGuest(consoleLog),
    pollMs: 600_000,
    probe: async () => ({ exists: running, running, endedWhy: 'powered off', details: {} }),
  };
  const stop = new AbortController();
  const waiting = waitForGuest(guest, {
    signal: stop.signal,
    // The first poll saw the guest running: it now prints its exit and powers off.
    onProgress: () => {
      running = false;
      void writeFile(consoleLog, 'VSP-START\r\nVSP-EXIT 0\r\n');
    },
  });
  // Should it fail, the wait is stopped at the timeout rather than left pending.
  const timeout = setTimeout(() => stop.abort(), 9_000);
  await expect(waiting).resolves.toMatchObject({ exitCode: 0, timedOut: false });
  clearTimeout(timeout);
}, 10_000);
