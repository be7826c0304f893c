import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';

/** A range of host uids (and the gids of the same numbers) that no user or service of the host uses. */
export interface UidRange {
  first: number;
  last: number;
}

/** Above the ranges Debian gives users (1000-59999) and /etc/subuid's usual 100000-165535. */
export const DEFAULT_TASK_UIDS: UidRange = { first: 3_000_000, last: 3_999_999 };
/** Machine-wide, because several host workers (the dev cluster's) can share one machine's uids. */
export const DEFAULT_CLAIMS_DIR = '/run/vsp/task-uids';

/** Parses "first-last" (VSP_PROCESS_UIDS); refuses root, system and user ids. */
export function parseUidRange(text: string): UidRange {
  const m = /^(\d+)-(\d+)$/.exec(text.trim());
  const first = Number(m?.[1]);
  const last = Number(m?.[2]);
  if (!m || !Number.isSafeInteger(first) || !Number.isSafeInteger(last) || first > last)
    throw new Error(`task uid range ${JSON.stringify(text)} must be "first-last" with first <= last`);
  if (first < 100_000 || last > 0xfffffffe - 1)
    throw new Error(
      `task uid range ${text} must lie within 100000..4294967293: below are root, system and user accounts`,
    );
  return { first, last };
}

/**
 * One uid per task from a range, so that no two tasks, on any host worker of this machine, share an
 * account: each task's home, temp folder and processes are its own. A claim is a file named by the uid
 * whose content names the VM (its folder, or `<file>#...`), created with O_EXCL; released when the VM is
 * destroyed, and taken back when what it names is gone (a worker that crashed, a folder removed by hand).
 */
export class TaskAccounts {
  constructor(
    private readonly range: UidRange = DEFAULT_TASK_UIDS,
    private readonly claimsDir: string = DEFAULT_CLAIMS_DIR,
  ) {}

  /** The uid claimed for `vmKey` (its existing claim, or a fresh one). */
  async claim(vmKey: string): Promise<number> {
    await fs.mkdir(this.claimsDir, { recursive: true, mode: 0o700 });
    const size = this.range.last - this.range.first + 1;
    // Start where the VM's name points, so that concurrent claims rarely probe the same uids.
    const start = createHash('sha256').update(vmKey).digest().readUInt32BE(0) % size;
    for (let i = 0; i < Math.min(size, 4096); i++) {
      const uid = this.range.first + ((start + i) % size);
      const file = path.join(this.claimsDir, String(uid));
      try {
        await fs.writeFile(file, vmKey, { flag: 'wx', mode: 0o600 });
        return uid;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        const held = await fs.readFile(file, 'utf8').catch(() => '');
        if (held === vmKey) return uid;
        if (await isStale(file, held)) {
          await fs.rm(file, { force: true });
          i--; // the same uid again
        }
      }
    }
    throw new Error(
      `no free task uid in ${this.range.first}-${this.range.last} (claims in ${this.claimsDir})`,
    );
  }

  /** Releases the uid if `vmKey` holds it; a uid claimed by another VM is left alone. */
  async release(uid: number, vmKey: string): Promise<void> {
    const file = path.join(this.claimsDir, String(uid));
    if ((await fs.readFile(file, 'utf8').catch(() => undefined)) === vmKey)
      await fs.rm(file, { force: true });
  }
}

/** Claims outlive no crash: one whose folder or file is gone (and not just being made) is free again. */
const STALE_AFTER_MS = 60_000;

async function isStale(file: string, held: string): Promise<boolean> {
  const owner = held.split('#')[0];
  if (!owner || (await fs.stat(owner).catch(() => undefined))) return false;
  const st = await fs.stat(file).catch(() => undefined);
  // Re-read: another claimer may have taken the uid meanwhile.
  return (
    st !== undefined && Date.now() - st.mtimeMs > STALE_AFTER_MS && (await fs.readFile(file, 'utf8')) === held
  );
}
