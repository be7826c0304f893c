import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import type { Logger } from '../../logging/logger';

const POLL_MS = 1000;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Runs `fn` holding an exclusive lock file (its content: the holder's pid). A lock whose holder died is
 * taken over, so a crashed `up` never blocks the next `down`. Waits up to `timeoutMs` for a live holder.
 */
export async function withLock<T>(
  file: string,
  what: string,
  log: Logger,
  timeoutMs: number,
  fn: () => Promise<T>,
): Promise<T> {
  await fs.mkdir(path.dirname(file), { recursive: true });
  const deadline = Date.now() + timeoutMs;
  let reported = false;
  for (;;) {
    try {
      await fs.writeFile(file, `${process.pid}\n`, { flag: 'wx' });
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = Number((await fs.readFile(file, 'utf8').catch(() => '')).trim());
    if (!Number.isInteger(holder) || holder <= 0 || !alive(holder)) {
      // A dead holder's lock (or one being written just now: then the retry finds it live).
      await fs.rm(file, { force: true });
      continue;
    }
    if (Date.now() >= deadline)
      throw new Error(`${what}: another run (pid ${holder}) still holds ${file} after ${timeoutMs} ms`);
    if (!reported) log.info({ holder, lock: file }, `${what}: waiting for another run to finish`);
    reported = true;
    await sleep(POLL_MS);
  }
  try {
    return await fn();
  } finally {
    await fs.rm(file, { force: true });
  }
}
