import { promises as fs } from 'node:fs';
import path from 'node:path';
import { GuestDiskTools } from './guestDiskTools';
import { judgeTree, listHostTree, type OutputBounds, type TreeEntry, type TreeVerdict } from './outputTree';

const MiB = 1024 * 1024;
/** Files dumped by one debugfs run; bigger files get a run each, so that its file-size limit is theirs. */
const BATCH = 64;

interface ImageEntry extends TreeEntry {
  ino: number;
}

/** A tree on a guest's disk the worker will not take, with the reason and what the owner is told. */
export class RefusedTree extends Error {
  constructor(readonly verdict: TreeVerdict) {
    super(verdict.message);
    this.name = 'RefusedTree';
  }
}

// ls -p: /inode/mode/uid/gid/name/size/ (a name may itself hold '/': the judge refuses those).
const LS_LINE = /^\/(\d+)\/(\d+)\/\d+\/\d+\/(.*)\/(\d*)\/$/s;
const S_IFMT = 0o170000;

/**
 * Reads a folder of a guest-written ext4 disk the way a provider must treat it: as hostile. Everything the
 * tools do runs through GuestDiskTools (an unprivileged account, limits, namespaces). The folder is first
 * listed level by level by inode (never by name), judged as a whole (types, names, depth, count, bytes by
 * apparent size), and only then are its regular files dumped by inode number to names the worker chose,
 * and moved by the worker into folders it made. A listing a crafted name could garble is refused. What
 * lands on the host is checked again before it is handed over.
 */
export class GuestDiskReader {
  constructor(
    private readonly image: string,
    private readonly scratch: string,
    private readonly hide: string,
    private readonly tools = new GuestDiskTools(),
  ) {}

  private runs = 0;

  /** A debugfs run in a fresh work folder under the scratch folder (each run has an account of its own). */
  private async debugfs(script: string[], fileBytes: number) {
    const workDir = path.join(this.scratch, `run-${++this.runs}`);
    await fs.mkdir(workDir, { recursive: true });
    const scriptFile = path.join(workDir, 'script');
    await fs.writeFile(scriptFile, script.join('\n') + '\n', { mode: 0o644 });
    const r = await this.tools.run(this.image, 'debugfs', ['-f', 'script', 'IMAGE'], {
      workDir,
      hide: this.hide,
      limits: { fileBytes },
      maxBuffer: 512 * MiB,
    });
    return { ...r, workDir };
  }

  /** Replays the journal a VM killed mid-write left (e2fsck, journal only), when there is one. */
  async replayJournal(): Promise<boolean> {
    const workDir = path.join(this.scratch, `run-${++this.runs}`);
    const opts = { workDir, hide: this.hide };
    const { stdout } = await this.tools.run(this.image, 'dumpe2fs', ['-h', 'IMAGE'], opts);
    if (!/^Filesystem features:.*\bneeds_recovery\b/m.test(stdout)) return false;
    await this.tools
      .run(this.image, 'e2fsck', ['-y', '-E', 'journal_only', 'IMAGE'], { ...opts, write: true })
      .catch((err: unknown) => {
        // e2fsck exits 1 when it changed the file system, which is the point here.
        if (((err as Error).cause as { code?: unknown } | undefined)?.code !== 1) throw err;
      });
    return true;
  }

  /** `dumpe2fs -h`: the superblock's fields. */
  async superblock(): Promise<string> {
    const workDir = path.join(this.scratch, `run-${++this.runs}`);
    return (await this.tools.run(this.image, 'dumpe2fs', ['-h', 'IMAGE'], { workDir, hide: this.hide }))
      .stdout;
  }

  /** Copies one file of the disk (by path) to `dest`, at most `maxBytes` of it; false when absent. */
  async copyFile(diskPath: string, dest: string, maxBytes: number): Promise<boolean> {
    if (!/^\/[A-Za-z0-9_./-]+$/.test(diskPath)) throw new Error(`unsupported disk path ${diskPath}`);
    const { workDir } = await this.debugfs([`dump "${diskPath}" out`], maxBytes).catch(
      async (err: unknown) => {
        // Killed at the size limit (SIGXFSZ): the first maxBytes are there, which is what a log needs.
        const workDir = path.join(this.scratch, `run-${this.runs}`);
        if (!(await regularFile(path.join(workDir, 'out')))) throw err;
        return { workDir };
      },
    );
    const out = path.join(workDir, 'out');
    if (!(await regularFile(out))) return false;
    await fs.rename(out, dest);
    await fs.chown(dest, 0, 0);
    return true;
  }

  /**
   * Extracts the folder `rel` into `dest` (created). Returns false when the disk has no such folder;
   * throws RefusedTree when the folder cannot be taken, naming why, and Error when `rel` is not a folder.
   */
  async extractFolder(rel: string, dest: string, bounds: OutputBounds): Promise<boolean> {
    const entries = await this.scan(rel, bounds);
    if (!entries) return false;
    const verdict = judgeTree(entries, bounds);
    if (verdict) throw new RefusedTree(verdict);

    await fs.mkdir(dest);
    for (const e of entries) if (e.type === 'dir') await fs.mkdir(path.join(dest, ...e.rel.split('\0')));
    const files = entries.filter((e) => e.type === 'file').sort((a, b) => a.size - b.size);
    // Sorted by size, a batch's limit is its largest file, so a listing that understates a size can
    // at most double what lands here.
    const alone = Math.max(MiB, Math.floor(bounds.maxBytes / BATCH));
    const batches: ImageEntry[][] = [];
    for (const f of files) {
      const last = batches[batches.length - 1];
      if (f.size <= alone && last && last.length < BATCH && last[0].size <= alone) last.push(f);
      else batches.push([f]);
    }
    for (const batch of batches) {
      const limit = Math.max(batch[batch.length - 1].size, 1);
      const { workDir } = await this.debugfs(
        batch.map((f, i) => `dump <${f.ino}> f${i}`),
        limit,
      );
      for (const [i, f] of batch.entries()) {
        const got = path.join(workDir, `f${i}`);
        const st = await fs.lstat(got).catch(() => undefined);
        if (!st?.isFile() || st.size !== f.size)
          throw new RefusedTree({
            reason: 'BadOutputs',
            message: `output ${f.rel.split('\0').join('/')} is not what the disk's listing says (a damaged or crafted disk)`,
          });
        const to = path.join(dest, ...f.rel.split('\0'));
        await fs.rename(got, to);
        await fs.chown(to, 0, 0);
        await fs.chmod(to, 0o644);
      }
    }
    // Belt and braces: the host's own view of what landed.
    const landed = judgeTree(await listHostTree(dest, bounds.maxDepth), bounds);
    if (landed) throw new RefusedTree(landed);
    return true;
  }

  /** Lists `rel` and below by levels; undefined when absent. Stops one level below the bounds. */
  private async scan(rel: string, bounds: OutputBounds): Promise<ImageEntry[] | undefined> {
    if (!/^[^"\\\n]+$/.test(rel)) throw new Error(`outputDir ${JSON.stringify(rel)} cannot be read`);
    const out: ImageEntry[] = [];
    let level: { cmd: string; rel: string[] }[] = [{ cmd: `ls -p "/${rel}"`, rel: [] }];
    for (let depth = 0; level.length > 0 && depth <= bounds.maxDepth; depth++) {
      const r = await this.debugfs(
        level.map((l) => l.cmd),
        MiB,
      );
      const errors = r.stderr.split('\n').filter((l) => l.trim() !== '' && !/^debugfs [\d.]+ \(/.test(l));
      if (depth === 0 && errors.some((l) => /File not found/.test(l))) return undefined;
      if (depth === 0 && errors.some((l) => /not a directory/.test(l)))
        throw new Error(`outputDir ${rel} is not a folder on the data disk`);
      if (errors.length > 0)
        throw new RefusedTree({
          reason: 'BadOutputs',
          message: `the data disk's folder ${rel} cannot be listed (a damaged or crafted disk): ${errors[0].slice(0, 200)}`,
        });
      const next: typeof level = [];
      let at = -1;
      for (const line of r.stdout.split('\n')) {
        if (line === '') continue;
        if (line.startsWith('debugfs: ')) {
          // Each listing follows its command's echo, in order; a name that forges one shifts them.
          if (line !== `debugfs: ${level[++at]?.cmd}`) return garbled(rel);
          continue;
        }
        const m = LS_LINE.exec(line);
        if (!m || at < 0) return garbled(rel);
        const [ino, mode, name, size] = [Number(m[1]), parseInt(m[2], 8), m[3], Number(m[4] || 0)];
        if (name === '.' || name === '..') continue;
        const ifmt = mode & S_IFMT;
        const type =
          ifmt === 0o100000 ? 'file' : ifmt === 0o040000 ? 'dir' : ifmt === 0o120000 ? 'symlink' : 'other';
        const names = [...level[at].rel, name];
        out.push({ ino, rel: names.join('\0'), type, size });
        if (out.length > bounds.maxEntries) return out;
        if (type === 'dir' && !name.includes('/')) next.push({ cmd: `ls -p <${ino}>`, rel: names });
      }
      if (at !== level.length - 1) return garbled(rel);
      level = next;
    }
    return out;
  }
}

function garbled(rel: string): never {
  throw new RefusedTree({
    reason: 'BadOutputs',
    message: `the listing of ${rel} on the data disk is garbled (a name with a line break, or a damaged disk)`,
  });
}

async function regularFile(p: string): Promise<boolean> {
  return fs.lstat(p).then(
    (s) => s.isFile(),
    () => false,
  );
}
