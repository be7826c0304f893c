import { promises as fs } from 'node:fs';
import path from 'node:path';

/** How much a guest may hand back: bytes by apparent size (a sparse file counts whole), entries, depth. */
export interface OutputBounds {
  maxBytes: number;
  maxEntries: number;
  maxDepth: number;
}

export const DEFAULT_MAX_ENTRIES = 100_000;
export const DEFAULT_MAX_DEPTH = 64;

/** One entry of a tree, as a listing gives it: path relative to the tree's root, type, apparent size. */
export interface TreeEntry {
  rel: string;
  type: 'file' | 'dir' | 'symlink' | 'other';
  size: number;
}

/** Why a tree cannot be taken, or undefined when it fits. */
export interface TreeVerdict {
  reason: 'OutputsTooLarge' | 'BadOutputs';
  message: string;
}

const NAME_MAX = 255;
// Control characters make names that a listing or a log can misread.
// eslint-disable-next-line no-control-regex
const BAD_NAME = /[\u0000-\u001f\u007f/]/;

/**
 * Judges a tree entry by entry: only regular files and folders, names without '/', control characters,
 * '.' or '..' and at most 255 bytes, within the bounds. Lists a few offenders by name, so that the owner
 * learns what to change.
 */
export function judgeTree(entries: Iterable<TreeEntry>, bounds: OutputBounds): TreeVerdict | undefined {
  const bad: string[] = [];
  let bytes = 0;
  let count = 0;
  let deepest = '';
  const seen = new Set<string>();
  for (const e of entries) {
    count++;
    const names = e.rel.split('\0');
    const depth = names.length;
    const shown = names.join('/');
    const name = names[names.length - 1];
    if (depth > bounds.maxDepth && !deepest) deepest = shown;
    if (seen.has(e.rel)) bad.push(`${shown} (a second entry of that name)`);
    seen.add(e.rel);
    if (name === '.' || name === '..' || BAD_NAME.test(name) || Buffer.byteLength(name) > NAME_MAX)
      bad.push(`${JSON.stringify(shown.slice(0, 120))} (a name VSP cannot store)`);
    else if (e.type === 'symlink') bad.push(`${shown} (a symlink)`);
    else if (e.type === 'other') bad.push(`${shown} (not a regular file or folder)`);
    if (e.type === 'file') bytes += e.size;
  }
  if (deepest)
    return {
      reason: 'BadOutputs',
      message: `outputs nest deeper than ${bounds.maxDepth} folders (${deepest.slice(0, 200)}...)`,
    };
  if (count > bounds.maxEntries)
    return { reason: 'BadOutputs', message: `outputs hold ${count} entries, more than ${bounds.maxEntries}` };
  if (bad.length > 0)
    return {
      reason: 'BadOutputs',
      message: `outputs that cannot be stored: ${bad.slice(0, 10).join(', ')}${bad.length > 10 ? `, and ${bad.length - 10} more` : ''}`,
    };
  if (bytes > bounds.maxBytes)
    return {
      reason: 'OutputsTooLarge',
      message: `outputs of ${bytes} bytes (sparse files count by their size) exceed the declared room of ${bounds.maxBytes} bytes`,
    };
  return undefined;
}

/**
 * The entries of a host folder, never following a symlink; names joined by NUL (no name holds one). Goes
 * one level below `maxDepth`, so that a tree too deep shows as such.
 */
export async function listHostTree(dir: string, maxDepth: number): Promise<TreeEntry[]> {
  const out: TreeEntry[] = [];
  const walk = async (abs: string, rel: string[]): Promise<void> => {
    for (const e of await fs.readdir(abs, { withFileTypes: true })) {
      const full = path.join(abs, e.name);
      const names = [...rel, e.name];
      const st = await fs.lstat(full);
      const type = st.isFile()
        ? 'file'
        : st.isDirectory()
          ? 'dir'
          : st.isSymbolicLink()
            ? 'symlink'
            : 'other';
      out.push({ rel: names.join('\0'), type, size: st.size });
      if (type === 'dir' && names.length <= maxDepth) await walk(full, names);
    }
  };
  await walk(dir, []);
  return out;
}
