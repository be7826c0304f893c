import { promises as fs } from 'node:fs';
import path from 'node:path';

import type { Logger } from '../../logging/logger';
import { describeError } from '../../logging/logger';

/** Marks a cached entry as used now (pruneUnused goes by modification time). */
export async function touch(p: string): Promise<void> {
  const now = new Date();
  await fs.utimes(p, now, now);
}

/**
 * Removes the entries of a cache folder (images, warm snapshots) that nothing used for `maxAgeMs`; recent
 * ones stay, as they may belong to another checkout on this machine.
 */
export async function pruneUnused(dir: string, maxAgeMs: number, log: Logger): Promise<void> {
  for (const name of await fs.readdir(dir).catch(() => [] as string[])) {
    const p = path.join(dir, name);
    const st = await fs.stat(p).catch(() => undefined);
    if (!st || Date.now() - st.mtimeMs < maxAgeMs) continue;
    await fs
      .rm(p, { recursive: true, force: true })
      .then(() => log.info({ removed: p }, 'removed an unused cache entry'))
      .catch((err: unknown) =>
        log.warn({ entry: p, err: describeError(err) }, 'could not remove a cache entry'),
      );
  }
}
