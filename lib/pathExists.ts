import { promises as fs } from 'node:fs';

/** Whether `file` exists (a symlink counts by its target); any error reads as "no". */
export function pathExists(file: string): Promise<boolean> {
  return fs.access(file).then(
    () => true,
    () => false,
  );
}
