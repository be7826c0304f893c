import { promises as fs } from 'node:fs';
import path from 'node:path';
import { normaliseRepoPath } from '../../spec/repoPath';

export interface OutputFile {
  local: string;
  /** Path relative to the outputs folder, '/'-separated. */
  rel: string;
  size: number;
}

/**
 * Regular files under a folder, sorted. Symlinks and devices are refused by name: a task must not
 * make the host upload files from outside its own outputs.
 */
export async function listOutputFiles(dir: string): Promise<OutputFile[]> {
  const out: OutputFile[] = [];
  const refused: string[] = [];
  for (const entry of await fs.readdir(dir, { withFileTypes: true, recursive: true })) {
    const local = path.join(entry.parentPath, entry.name);
    const rel = path.relative(dir, local).split(path.sep).join('/');
    if (entry.isDirectory()) continue;
    if (!entry.isFile()) {
      refused.push(`${rel} (not a regular file)`);
      continue;
    }
    try {
      normaliseRepoPath(rel, 'output path');
    } catch (err) {
      refused.push(`${rel} (${(err as Error).message})`);
      continue;
    }
    out.push({ local, rel, size: (await fs.lstat(local)).size });
  }
  if (refused.length > 0)
    throw new Error(`the task wrote outputs that cannot be stored: ${refused.join(', ')}`);
  return out.sort((a, b) => a.rel.localeCompare(b.rel));
}
