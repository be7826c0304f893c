import { promises as fs } from 'node:fs';
import path from 'node:path';
import { UnusableOutputsError } from './diskImageStaging';
import type { ExtractedOutputs, HomeStaging } from './homeStaging';
import { DEFAULT_MAX_DEPTH, DEFAULT_MAX_ENTRIES, judgeTree, listHostTree } from './outputTree';
import type { VmPaths } from './vmStore';

/** Staging for the process driver: the inputs folder becomes the task's home as it is. */
export class DirectoryStaging implements HomeStaging {
  readonly kind = 'directory' as const;
  /** The inputs folder becomes the home as it is: each download is fsynced. */
  readonly syncsInputs = false;

  /** The inputs folder is the home-to-be: nothing to make beforehand. */
  async prepare(vm: VmPaths): Promise<void> {
    if (!(await isDir(vm.homeDir))) await fs.mkdir(vm.inputsDir, { recursive: true });
  }

  async build(vm: VmPaths, outputRoomBytes: number): Promise<{ bytes: number }> {
    const free = await freeBytes(vm.dir);
    if (free < outputRoomBytes)
      throw new Error(
        `host disk has ${free} bytes free, less than the ${outputRoomBytes} bytes of output room`,
      );
    // A retried build finds the home already in place.
    if (!(await isDir(vm.homeDir))) {
      await fs.mkdir(vm.inputsDir, { recursive: true });
      await fs.rename(vm.inputsDir, vm.homeDir);
    }
    return { bytes: await treeBytes(vm.homeDir) };
  }

  async extract(vm: VmPaths, outputDir: string): Promise<ExtractedOutputs> {
    const outputsDir = path.join(vm.outboxDir, 'outputs');
    await fs.rm(vm.outboxDir, { recursive: true, force: true });
    await fs.mkdir(outputsDir, { recursive: true });
    const taskLog = (await exists(vm.taskLog)) ? vm.taskLog : undefined;
    const src = path.join(vm.homeDir, outputDir);
    // The home is the task's (its processes are gone by now): a symlink on the way to outputDir would make
    // root copy a folder of the host, and a FIFO or device would block or fail the copy. Judge first.
    const parts = path.relative(vm.homeDir, src).split(path.sep);
    for (let i = 1; i <= parts.length; i++) {
      const st = await fs.lstat(path.join(vm.homeDir, ...parts.slice(0, i))).catch(() => undefined);
      if (st?.isSymbolicLink())
        throw new UnusableOutputsError(
          `outputDir ${outputDir} is or lies under a symlink in the task's home`,
          'BadOutputs',
          taskLog,
        );
    }
    if (!(await isDir(src))) return { outputsDir, taskLog };
    const bounds = { maxBytes: Infinity, maxEntries: DEFAULT_MAX_ENTRIES, maxDepth: DEFAULT_MAX_DEPTH };
    // The declared room is checked at upload, as for every driver.
    const verdict = judgeTree(await listHostTree(src, bounds.maxDepth), bounds);
    if (verdict) throw new UnusableOutputsError(verdict.message, verdict.reason, taskLog);
    await fs.cp(src, outputsDir, { recursive: true });
    return { outputsDir, taskLog };
  }
}

async function exists(p: string): Promise<boolean> {
  return fs.lstat(p).then(
    () => true,
    () => false,
  );
}

async function isDir(p: string): Promise<boolean> {
  return fs.stat(p).then(
    (s) => s.isDirectory(),
    () => false,
  );
}

export async function freeBytes(dir: string): Promise<number> {
  const s = await fs.statfs(dir);
  return s.bavail * s.bsize;
}

/** Total size of the regular files under a folder (symlinks are not followed). */
export async function treeBytes(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await fs.readdir(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) total += (await fs.lstat(path.join(entry.parentPath, entry.name))).size;
  }
  return total;
}
