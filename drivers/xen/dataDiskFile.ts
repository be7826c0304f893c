import { promises as fs } from 'node:fs';
import path from 'node:path';
import { runCommand } from '../qemu/runCommand';

const DEBUGFS_TIMEOUT_MS = 30_000;

/**
 * Writes `content` to `relPath` on an ext4 data disk without mounting it (debugfs), then reads it back:
 * the guest init runs `.vsp/command` from there. `workDir` holds the staging copy. The counterpart of
 * storage/diskImageStaging.ts `readDataDiskFile`.
 */
export async function writeDataDiskFile(
  dataDisk: string,
  relPath: string,
  content: string,
  workDir: string,
): Promise<void> {
  if (!/^[A-Za-z0-9_.-]+(\/[A-Za-z0-9_.-]+)*$/.test(relPath) || relPath.split('/').includes('..'))
    throw new Error(`data disk path ${JSON.stringify(relPath)} must be relative, without '..'`);
  const local = path.join(workDir, path.basename(relPath));
  await fs.writeFile(local, content);
  const dirs = relPath.split('/').slice(0, -1);
  const script = [
    ...dirs.map((_, i) => `mkdir "/${dirs.slice(0, i + 1).join('/')}"`),
    `rm "/${relPath}"`,
    `write "${local}" "/${relPath}"`,
  ];
  const scriptFile = `${local}.debugfs`;
  await fs.writeFile(scriptFile, script.join('\n') + '\n');
  try {
    await runCommand('debugfs', ['-w', '-f', scriptFile, dataDisk], { timeoutMs: DEBUGFS_TIMEOUT_MS });
    const check = await runCommand('debugfs', ['-R', `cat "/${relPath}"`, dataDisk], {
      timeoutMs: DEBUGFS_TIMEOUT_MS,
    });
    if (check.stdout !== content)
      throw new Error(
        `could not write /${relPath} on ${dataDisk}: ${check.stderr.trim() || 'content differs'}`,
      );
  } finally {
    await fs.rm(scriptFile, { force: true });
  }
}
