import { closeSync, fsyncSync, openSync, promises as fs, renameSync, writeSync } from 'node:fs';
import path from 'node:path';

/**
 * Flushes a file's data (or a folder's entries) to disk, so a rename that publishes it cannot expose an
 * empty file after a crash.
 */
export async function fsyncFile(file: string): Promise<void> {
  const fh = await fs.open(file, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Writes `data` so readers see the old content or the new, never a part (temp file, fsync, rename);
 * `mode` for a new file (default 0666 less the umask).
 */
export async function writeFileAtomic(file: string, data: string, mode?: number): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  await fs.writeFile(tmp, data, mode === undefined ? undefined : { mode });
  await fsyncFile(tmp);
  await fs.rename(tmp, file);
  // The rename itself survives a power cut only once its folder is flushed too.
  await fsyncFile(path.dirname(file));
}

/**
 * Replaces `file` atomically against this process dying (a temp file renamed over it), without flushing
 * to disk: for small state rewritten every second or so that a power cut makes moot anyway (the live log's
 * place, next to a VM that a power cut ends). Two fsyncs a write, for every running task, cost more.
 */
export async function replaceFile(file: string, data: string, mode?: number): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  await fs.writeFile(tmp, data, mode === undefined ? undefined : { mode });
  await fs.rename(tmp, file);
}

/** The same for the few synchronous callers (command-line entry points writing a small file). */
export function writeFileAtomicSync(file: string, data: string): void {
  const tmp = `${file}.${process.pid}.tmp`;
  const fd = openSync(tmp, 'w');
  try {
    writeSync(fd, data);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, file);
  const dir = openSync(path.dirname(file), 'r');
  try {
    fsyncSync(dir);
  } finally {
    closeSync(dir);
  }
}
