import { promises as fs } from 'node:fs';
import path from 'node:path';
import { progressLine } from '../progress';
import { pathExists } from '../../lib/pathExists';
import { readTail } from '../../lib/fileRange';

/** What the guest told the host on its serial console (see deploy/guest/init). */
export interface ConsoleState {
  progress?: number;
  progressMessage?: string;
  /** Set once the guest printed VSP-EXIT. */
  exitCode?: number;
  /** The task wrote its first line (VSP-START seen). */
  started: boolean;
  /** The guest ran out of room on the data disk. */
  diskFull: boolean;
  /** A fatal error the guest init reported (VSP-ERROR). */
  guestError?: string;
}

const MAX_READ = 1 << 20;

/**
 * Follows a console log incrementally: each poll reads only the new bytes and parses whole lines.
 * Kernel messages may interleave; only lines starting with VSP- count.
 */
export class ConsoleFollower {
  private offset = 0;
  private partial = '';
  readonly state: ConsoleState = { started: false, diskFull: false };

  constructor(private readonly file: string) {}

  async poll(): Promise<ConsoleState> {
    let fh: fs.FileHandle;
    try {
      fh = await fs.open(this.file, 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return this.state;
      throw err;
    }
    try {
      for (;;) {
        const buf = Buffer.alloc(MAX_READ);
        const { bytesRead } = await fh.read(buf, 0, MAX_READ, this.offset);
        if (bytesRead === 0) break;
        this.offset += bytesRead;
        this.feed(buf.subarray(0, bytesRead).toString('utf8'));
      }
    } finally {
      await fh.close();
    }
    return this.state;
  }

  private feed(text: string): void {
    const lines = (this.partial + text).split('\n');
    this.partial = lines.pop() ?? '';
    for (const raw of lines) this.parseLine(raw.replace(/\r$/, ''));
  }

  private parseLine(line: string): void {
    // The same reading as the process driver's task log: the guest forwards the task's lines unchanged.
    const progress = progressLine(line);
    if (progress) {
      this.state.progress = progress.progress;
      this.state.progressMessage = progress.message;
      return;
    }
    const exit = /^VSP-EXIT (\d+)$/.exec(line);
    if (exit) this.state.exitCode = Number(exit[1]);
    else if (line === 'VSP-START') this.state.started = true;
    else if (line === 'VSP-DISK-FULL') this.state.diskFull = true;
    else if (line.startsWith('VSP-ERROR ')) this.state.guestError = line.slice('VSP-ERROR '.length);
  }
}

/** The last `lines` lines of a console log, for error messages. */
export async function consoleTail(file: string, lines = 30): Promise<string> {
  if (!(await pathExists(file))) return '(no console log)';
  return (await readTail(file, 16 * 1024)).split('\n').slice(-lines).join('\n').trim();
}

/**
 * Where a host keeps the console a VM wrote here once the VM left it, until the task's logs hold it:
 * outside the VM folder, which goes with the VM (and on a return the VM starts a new console there).
 */
export function departedConsoleOf(storeRoot: string, vmId: string): string {
  return path.join(storeRoot, 'departed-consoles', `${vmId}.log`);
}

/**
 * Sets a finished console aside (its QEMU gone). Renaming is atomic, so a retry after a crash finds it
 * either still in place or already moved. A segment an earlier departure left unkept is extended.
 */
export async function setConsoleAside(consoleLog: string, departed: string): Promise<void> {
  await fs.mkdir(path.dirname(departed), { recursive: true });
  const earlier = await fs.stat(departed).then(
    () => true,
    () => false,
  );
  try {
    if (earlier) {
      await fs.appendFile(departed, await fs.readFile(consoleLog));
      await fs.rm(consoleLog);
    } else {
      await fs.rename(consoleLog, departed);
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}
