import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { fsyncFile, writeFileAtomic } from './durableFile';
import { runCommand } from '../lib/runCommand';
import { createLogger } from '../logging/logger';
import { normaliseRepoPath } from '../spec/repoPath';
import { GuestDiskReader, RefusedTree } from './guestDiskReader';
import { GuestDiskTools } from './guestDiskTools';
import type { ExtractedOutputs, HomeStaging, StagingPlan } from './homeStaging';
import { isMountPoint, mountStagingImage, stagingImageOf, unmountStagingImage } from './stagingMount';
import { DEFAULT_MAX_DEPTH, DEFAULT_MAX_ENTRIES } from './outputTree';
import type { VmPaths } from './vmStore';
import { pathExists } from '../lib/pathExists';

const MiB = 1024 * 1024;
const BLOCK = 4096;
const INODE_BYTES = 256;
/** Reserved for root inside the guest: the init can still write exit status and log on a full disk. */
const RESERVED_BYTES = MiB;
/** ext4 wants the journal well below the file system size: small disks get a small one. */
const journalMiB = (bytes: number) => (bytes < 256 * MiB ? 4 : 16);
/** Below this much free room (beyond the reserve) after the task, the outputs filled the disk. */
const FULL_SLACK_BYTES = 256 * 1024;
const TOOL_TIMEOUT_MS = 30 * 60_000;
/** The task log as the owner gets it: its first 64 MiB. */
const TASK_LOG_MAX_BYTES = 64 * MiB;
/** Folder on the data disk for VSP's own files (command, task.log, exit-status). */
export const VSP_DIR = '.vsp';

/**
 * The task left outputs that cannot be taken: it filled its data disk beyond the declared room, or its
 * outputDir is not a folder. The task's own doing, so retrying cannot help; the task log, when there is
 * one, was still extracted so that it can reach the owner.
 */
export class UnusableOutputsError extends Error {
  constructor(
    message: string,
    readonly reason: 'OutputsTooLarge' | 'BadOutputs',
    readonly taskLog?: string,
  ) {
    super(message);
    this.name = 'UnusableOutputsError';
  }
}

interface StagingRecord {
  inputBytes: number;
  outputRoomBytes: number;
  imageBytes: number;
}

/**
 * Task homes as ext4 data-disk images (the paper's mechanism). The inputs stream from the repository
 * straight onto the new disk (prepare mounts it, build publishes it), or mke2fs -d copies in a folder
 * of them; the outputs come out without mounting the guest-written disk (GuestDiskReader). The disk
 * root is the owner's home.
 */
export class DiskImageStaging implements HomeStaging {
  readonly kind = 'disk-image' as const;
  /**
   * build() unmounts the disk the inputs were downloaded onto and fsyncs its image (or copies a folder
   * of them into a new image, fsynced): one flush for all of them. Until then a worker that died left
   * them in the kernel's cache (the mount outlives it), and a host that died takes the disk with it.
   */
  readonly syncsInputs = true;
  private readonly log = createLogger('disk-staging');

  constructor(private readonly tools = new GuestDiskTools()) {}

  /**
   * Makes the data disk empty, sized for `plan`, and mounts it on `vm.inputsDir`, so that the inputs
   * downloaded there land once, on the disk itself; build() then finishes it. A retry finds the disk
   * still mounted with what the earlier attempt verified, and keeps it.
   */
  async prepare(vm: VmPaths, plan: StagingPlan, opts: { signal?: AbortSignal } = {}): Promise<void> {
    checkRoom(plan.outputRoomBytes);
    if (await isMountPoint(vm.inputsDir)) return;
    if (!(await pathExists(vm.inputsDir)) && (await pathExists(vm.dataDisk))) return;
    const usage = planUsage(plan.files);
    await fs.mkdir(vm.dir, { recursive: true });
    await removeStaleBuilds(vm);
    // The disk is sparse: a full store would show as I/O errors on the mounted disk mid-download, so it
    // is checked here, worded as the full disk it is (the task fails at once, StoreFull).
    const { bavail, bsize } = await fs.statfs(vm.dir);
    if (bavail * bsize < usage.bytes + 4 * MiB)
      throw Object.assign(
        new Error(
          `No space left on device: the VM store has ${bavail * bsize} bytes free, the inputs take ${usage.bytes}`,
        ),
        { code: 'ENOSPC' },
      );
    await fs.rm(vm.inputsDir, { recursive: true, force: true });
    const image = stagingImageOf(vm.dataDisk);
    try {
      const record = await makeFileSystem(image, usage, plan.outputRoomBytes, undefined, opts.signal);
      await writeFileAtomic(stagingRecordOf(vm), JSON.stringify(record));
      await mountStagingImage(image, vm.inputsDir, opts.signal);
    } catch (err) {
      await unmountStagingImage(image, vm.inputsDir).catch(() => undefined);
      await fs.rm(image, { force: true });
      throw new Error(`cannot make the data disk ${vm.dataDisk}`, { cause: err });
    }
  }

  async build(
    vm: VmPaths,
    outputRoomBytes: number,
    opts: { signal?: AbortSignal } = {},
  ): Promise<{ bytes: number }> {
    checkRoom(outputRoomBytes);
    const haveInputs = await pathExists(vm.inputsDir);
    if (!haveInputs && (await pathExists(vm.dataDisk))) {
      // A retry after a build that already finished (the inputs folder is removed last).
      return { bytes: (await fs.stat(vm.dataDisk)).size };
    }
    if (await isMountPoint(vm.inputsDir)) return this.finishMounted(vm);
    // Inputs placed in a plain folder (no prepare): mke2fs copies them in.
    await fs.mkdir(vm.inputsDir, { recursive: true });
    const usage = await measureInputs(vm.inputsDir);
    await fs.mkdir(path.join(vm.inputsDir, VSP_DIR));
    await removeStaleBuilds(vm);
    // One name per attempt; an earlier attempt's leftovers go (its tools were stopped with it).
    const tmp = `${vm.dataDisk}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
    let record: StagingRecord;
    try {
      record = await makeFileSystem(tmp, usage, outputRoomBytes, vm.inputsDir, opts.signal);
      await fsyncFile(tmp);
      await fs.rename(tmp, vm.dataDisk);
    } catch (err) {
      await fs.rm(tmp, { force: true });
      throw new Error(`cannot build the data disk ${vm.dataDisk}`, { cause: err });
    }
    await writeFileAtomic(stagingRecordOf(vm), JSON.stringify(record));
    await fs.rm(vm.inputsDir, { recursive: true, force: true });
    this.log.info({ dataDisk: vm.dataDisk, ...record, files: usage.entries }, 'data disk built');
    return { bytes: record.imageBytes };
  }

  /** The inputs are on the mounted disk: VSP's folder goes beside them, then the disk is unmounted and published. */
  private async finishMounted(vm: VmPaths): Promise<{ bytes: number }> {
    const image = stagingImageOf(vm.dataDisk);
    try {
      await fs.mkdir(path.join(vm.inputsDir, VSP_DIR));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST')
        throw new Error(`input ${VSP_DIR}/ is reserved for VSP's own files`, { cause: err });
      throw err;
    }
    await unmountStagingImage(image, vm.inputsDir);
    await fsyncFile(image);
    await fs.rename(image, vm.dataDisk);
    await fs.rm(vm.inputsDir, { recursive: true, force: true });
    const record = await readStagingRecord(vm);
    this.log.info({ dataDisk: vm.dataDisk, ...record }, 'data disk built');
    return { bytes: (await fs.stat(vm.dataDisk)).size };
  }

  /**
   * Takes the outputs and the task log off the data disk, which the guest wrote and so may be crafted:
   * GuestDiskReader reads it as an unprivileged account under limits, and refuses what it cannot take.
   */
  async extract(vm: VmPaths, outputDir: string): Promise<ExtractedOutputs> {
    const rel = normaliseRepoPath(outputDir, 'outputDir');
    if (rel.includes('"')) throw new Error(`outputDir ${JSON.stringify(rel)} contains a double quote`);
    if (rel === VSP_DIR || rel.startsWith(`${VSP_DIR}/`))
      throw new Error(`outputDir may not be inside ${VSP_DIR}/`);
    if (!(await pathExists(vm.dataDisk)))
      throw new Error(`no data disk ${vm.dataDisk} to extract outputs from`);
    const record = await readStagingRecord(vm);

    await fs.rm(vm.outboxDir, { recursive: true, force: true });
    await fs.mkdir(vm.outboxDir, { recursive: true, mode: 0o700 });
    const scratch = path.join(vm.outboxDir, '.scratch');
    const reader = new GuestDiskReader(vm.dataDisk, scratch, path.dirname(vm.dir), this.tools);
    try {
      if (await reader.replayJournal())
        this.log.info({ dataDisk: vm.dataDisk }, 'journal replayed: the VM ended without unmounting');
      const overflow = roomOverflow(await reader.superblock(), vm.dataDisk, record);

      // The task log first: it explains a failure, and unusable outputs are one.
      const taskLogFile = path.join(vm.outboxDir, 'task.log');
      const taskLog = (await reader.copyFile(`/${VSP_DIR}/task.log`, taskLogFile, TASK_LOG_MAX_BYTES))
        ? taskLogFile
        : undefined;
      if (taskLog) await markUnwrittenTail(taskLog);
      if (overflow) throw new UnusableOutputsError(overflow, 'OutputsTooLarge', taskLog);

      const outputsDir = path.join(vm.outboxDir, 'outputs');
      const bounds = {
        maxBytes: record?.outputRoomBytes ?? (await fs.stat(vm.dataDisk)).size,
        maxEntries: DEFAULT_MAX_ENTRIES,
        maxDepth: DEFAULT_MAX_DEPTH,
      };
      const found = await reader.extractFolder(rel, outputsDir, bounds).catch((err: unknown) => {
        if (err instanceof RefusedTree)
          throw new UnusableOutputsError(err.message, err.verdict.reason, taskLog);
        if (/is not a folder on the data disk/.test((err as Error).message))
          throw new UnusableOutputsError((err as Error).message, 'BadOutputs', taskLog);
        throw err;
      });
      if (!found) await fs.mkdir(outputsDir);
      this.log.info({ dataDisk: vm.dataDisk, outputsDir }, 'outputs extracted');
      return { outputsDir, ...(taskLog ? { taskLog } : {}) };
    } finally {
      await fs.rm(scratch, { recursive: true, force: true });
    }
  }
}

/**
 * A VM that stopped without writing its last log lines leaves the log's size ahead of its data: the end
 * reads as NUL bytes. Those bytes were never the task's; say so instead of handing them on.
 */
async function markUnwrittenTail(file: string): Promise<void> {
  const fh = await fs.open(file, 'r+');
  try {
    const { size } = await fh.stat();
    let end = size;
    const buf = Buffer.alloc(64 * 1024);
    while (end > 0) {
      const from = Math.max(0, end - buf.length);
      const { bytesRead } = await fh.read(buf, 0, end - from, from);
      let i = bytesRead;
      while (i > 0 && buf[i - 1] === 0) i--;
      end = from + i;
      if (i > 0) break;
    }
    if (end === size) return;
    await fh.truncate(end);
    const note = `${end > 0 ? '\n' : ''}[vsp] the last ${size - end} bytes of this log never reached the disk: the VM stopped before writing them\n`;
    await fh.write(note, end);
  } finally {
    await fh.close();
  }
}

/**
 * Data disks half-built by earlier attempts: `data.img.<pid>.<nonce>.tmp` (mke2fs -d) and the staging
 * image, unmounted first if a worker that died left it mounted.
 */
async function removeStaleBuilds(vm: VmPaths): Promise<void> {
  const staging = stagingImageOf(vm.dataDisk);
  await unmountStagingImage(staging, vm.inputsDir);
  await fs.rm(staging, { force: true });
  const dir = path.dirname(vm.dataDisk);
  const prefix = `${path.basename(vm.dataDisk)}.`;
  for (const name of await fs.readdir(dir))
    if (name.startsWith(prefix) && name.endsWith('.tmp')) await fs.rm(path.join(dir, name), { force: true });
}

/**
 * Makes an ext4 file system in `image` with room for `usage` plus `outputRoomBytes`, holding the files
 * of `from` when given; root keeps a small reserve.
 */
async function makeFileSystem(
  image: string,
  usage: Usage,
  outputRoomBytes: number,
  from: string | undefined,
  signal: AbortSignal | undefined,
): Promise<StagingRecord> {
  const inodes = usage.entries + 1024 + Math.ceil(outputRoomBytes / (64 * 1024));
  const payload = usage.bytes + outputRoomBytes;
  // ext4 metadata: journal, inode tables, bitmaps and extent blocks (~2%), plus the root reserve.
  const metadata = inodes * INODE_BYTES + Math.ceil(payload * 0.02) + RESERVED_BYTES + 4 * MiB;
  const journal = journalMiB(payload + metadata);
  const imageBytes = Math.ceil((payload + metadata + journal * MiB) / MiB) * MiB;
  const opts = { timeoutMs: TOOL_TIMEOUT_MS, signal };
  await runCommand(
    'mke2fs',
    [
      ...['-q', '-F', '-t', 'ext4', '-b', String(BLOCK), '-m', '0', '-N', String(inodes)],
      ...['-J', `size=${journal}`, '-E', 'root_owner=0:0', '-L', 'vsp-home'],
      ...(from ? ['-d', from] : []),
      image,
      `${imageBytes / 1024}k`,
    ],
    opts,
  );
  await runCommand('tune2fs', ['-r', String(RESERVED_BYTES / BLOCK), image], opts);
  return { inputBytes: usage.bytes, outputRoomBytes, imageBytes };
}

/**
 * Reads a file from a data disk without mounting it (as an unprivileged account), as the disk is: a
 * journal is not replayed here (the disk may still be in use); undefined when absent.
 */
export async function readDataDiskFile(dataDisk: string, relPath: string): Promise<string | undefined> {
  const scratch = path.join(path.dirname(dataDisk), `.read-${randomBytes(4).toString('hex')}`);
  try {
    const reader = new GuestDiskReader(dataDisk, scratch, path.dirname(path.dirname(dataDisk)));
    const local = path.join(scratch, 'file');
    return (await reader.copyFile(`/${relPath}`, local, 64 * MiB))
      ? await fs.readFile(local, 'utf8')
      : undefined;
  } finally {
    await fs.rm(scratch, { recursive: true, force: true });
  }
}

/**
 * Writes `content` to `relPath` on a data disk without mounting it (debugfs write, with `workDir` holding
 * the staging copy), then reads it back: the guest init runs `.vsp/command` from there.
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
    await runCommand('debugfs', ['-w', '-f', scriptFile, dataDisk], { timeoutMs: TOOL_TIMEOUT_MS });
    const check = await debugfs(dataDisk, `cat "/${relPath}"`);
    if (check.stdout !== content)
      throw new Error(
        `could not write /${relPath} on ${dataDisk}: ${check.stderr.trim() || 'content differs'}`,
      );
  } finally {
    await fs.rm(scriptFile, { force: true });
  }
}

function debugfs(image: string, request: string) {
  return runCommand('debugfs', ['-R', request, image], { timeoutMs: TOOL_TIMEOUT_MS, maxBuffer: 256 * MiB });
}

/** Why the task's outputs overflowed its declared room, or undefined when they did not. */
function roomOverflow(stdout: string, image: string, record: StagingRecord | undefined): string | undefined {
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(stdout)?.[1]);
  const free = field('Free blocks');
  const reserved = field('Reserved block count');
  const blockCount = field('Block count');
  const blockSize = field('Block size');
  if (![free, reserved, blockCount, blockSize].every(Number.isFinite))
    throw new Error(`cannot read the free space of ${image}`);
  // ext4 also holds back min(2%, 4096) blocks for its own metadata, which no task can use.
  const ext4Reserve = Math.min(Math.floor(blockCount / 50), 4096);
  if ((free - reserved - ext4Reserve) * blockSize >= FULL_SLACK_BYTES) return undefined;
  const room = record ? `${Math.round(record.outputRoomBytes / MiB)} MiB` : 'unknown size';
  return `outputs exceeded the declared room of ${room}: the task filled its data disk`;
}

interface Usage {
  /** Bytes the entries take in whole blocks. */
  bytes: number;
  entries: number;
}

/** The files and the folders on their paths, as they will take room on the disk. */
function planUsage(files: StagingPlan['files']): Usage {
  const dirs = new Set<string>();
  let bytes = 0;
  for (const f of files) {
    const parts = f.path.split('/');
    if (parts[0] === VSP_DIR) throw new Error(`input ${VSP_DIR}/ is reserved for VSP's own files`);
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join('/'));
    bytes += Math.ceil(f.size / BLOCK) * BLOCK;
  }
  return { bytes: bytes + dirs.size * BLOCK, entries: files.length + dirs.size };
}

function checkRoom(outputRoomBytes: number): void {
  if (!Number.isSafeInteger(outputRoomBytes) || outputRoomBytes < 0)
    throw new Error(`output room must be a non-negative byte count, got ${outputRoomBytes}`);
}

async function measureInputs(dir: string): Promise<Usage> {
  let bytes = 0;
  let entries = 0;
  const walk = async (d: string, rel: string): Promise<void> => {
    for (const e of await fs.readdir(d, { withFileTypes: true })) {
      const relPath = rel ? `${rel}/${e.name}` : e.name;
      if (!rel && e.name === VSP_DIR) throw new Error(`input ${VSP_DIR}/ is reserved for VSP's own files`);
      entries++;
      const full = path.join(d, e.name);
      if (e.isDirectory()) {
        bytes += BLOCK;
        await walk(full, relPath);
      } else if (e.isFile()) {
        bytes += Math.ceil((await fs.stat(full)).size / BLOCK) * BLOCK;
      } else if (e.isSymbolicLink()) {
        bytes += BLOCK;
      } else {
        throw new Error(`input ${relPath} is not a regular file, folder or symlink`);
      }
    }
  };
  await walk(dir, '');
  return { bytes, entries };
}

function stagingRecordOf(vm: VmPaths): string {
  return path.join(vm.dir, 'staging.json');
}

async function readStagingRecord(vm: VmPaths): Promise<StagingRecord | undefined> {
  try {
    return JSON.parse(await fs.readFile(stagingRecordOf(vm), 'utf8')) as StagingRecord;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}
