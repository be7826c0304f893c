import { promises as fs } from 'node:fs';
import path from 'node:path';
import { writeFileAtomic } from './durableFile';

const FILE = 'names.json';
const SHA256 = /^[0-9a-f]{64}$/;

/**
 * Which names tasks gave the images in a host's cache ('default', 'base:<name>'), by content hash: the
 * host reports them so that placement prefers a host that already has a task's image (locality).
 * Owners' own image paths are not recorded: they are nobody else's business.
 */
export class ImageNames {
  private writing: Promise<void> = Promise.resolve();

  constructor(private readonly imagesDir: string) {}

  /** Records that `name` is `sha256` (serialised: tasks finish staging concurrently). */
  record(name: string, sha256: string): Promise<void> {
    const next = this.writing.then(async () => {
      const names = await this.read();
      if (names[name] === sha256) return;
      names[name] = sha256;
      await writeFileAtomic(path.join(this.imagesDir, FILE), JSON.stringify(names));
    });
    this.writing = next.catch(() => undefined);
    return next;
  }

  /** Name -> hash; an unreadable index counts as empty (it only steers placement). */
  async read(): Promise<Record<string, string>> {
    try {
      const parsed = JSON.parse(await fs.readFile(path.join(this.imagesDir, FILE), 'utf8')) as unknown;
      if (typeof parsed !== 'object' || parsed === null) return {};
      return Object.fromEntries(
        Object.entries(parsed).filter((e): e is [string, string] => typeof e[1] === 'string'),
      );
    } catch {
      return {};
    }
  }

  /** The cached images (files `<sha256>.<format>`), each with the names recorded for it. */
  async cached(): Promise<{ sha256: string; names: string[] }[]> {
    const [files, names] = await Promise.all([fs.readdir(this.imagesDir).catch(() => []), this.read()]);
    const out: { sha256: string; names: string[] }[] = [];
    for (const f of files) {
      const sha256 = f.split('.')[0];
      if (!SHA256.test(sha256) || !/\.(qcow2|raw)$/.test(f)) continue;
      out.push({ sha256, names: Object.keys(names).filter((n) => names[n] === sha256) });
    }
    return out;
  }
}
