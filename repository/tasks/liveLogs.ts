import { EventEmitter } from 'node:events';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { readRange } from '../../lib/fileRange';

/**
 * Tasks' live logs (issue 14): what a running task printed (its output; a VM's console), sent by its
 * host while it runs and kept here, one append-only file per run (named by the run's capability, which
 * a re-run of the same task id never shares). Owners read them through the task API's `logs` route,
 * following new bytes as they land; the file stays after the task ends (bounded: `maxBytes` a run).
 */

/**
 * Bytes one append request may carry: the most any request but an upload may (httpApi's MAX_JSON_BODY);
 * a host with more sends one after the other at once.
 */
export const MAX_APPEND_BYTES = 64 * 1024;
/** What a run's live log may hold; its stored `task.log` keeps the whole output. */
export const DEFAULT_LIVE_LOG_BYTES = 16 << 20;

const CAPABILITY_ID = /^[A-Za-z0-9_-]{8,64}$/;

export class LiveLogError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'LiveLogError';
  }
}

export interface AppendResult {
  /** The log's size after the append: where the next one starts. */
  size: number;
  /** The log reached its limit: later bytes are dropped (the sender may stop). */
  full: boolean;
}

/** Where live logs are kept: files on this server (`local`), or PostgreSQL shared by many servers (`cluster`). */
export interface LiveLogStore {
  /** The log's size in bytes (0 when nothing was sent yet). */
  size(owner: string, capabilityId: string): Promise<number>;
  /**
   * Appends `bytes` sent as the log's bytes from `offset` on (the end when undefined). A retried append
   * (offset before the end) adds only what the log does not have yet; one past the end is refused with
   * 409, naming the size to continue from. Bytes beyond the limit are dropped, once marked as such.
   */
  append(
    owner: string,
    capabilityId: string,
    offset: number | undefined,
    bytes: Buffer,
  ): Promise<AppendResult>;
  /** Up to `max` of the log's bytes from `offset` on (empty when there are none yet). */
  read(owner: string, capabilityId: string, offset: number, max?: number): Promise<Buffer>;
  /** Resolves when the log grows, or after `ms` (whichever first), or when `signal` aborts. */
  waitForGrowth(owner: string, capabilityId: string, ms: number, signal: AbortSignal): Promise<void>;
}

/** A capability id as a log's name: checked before it reaches a path or a query. */
export function checkCapabilityId(capabilityId: string): void {
  if (!CAPABILITY_ID.test(capabilityId))
    throw new LiveLogError(400, `capability id ${JSON.stringify(capabilityId)} cannot name a log`);
}

/**
 * What of an append the log takes, given its size: the bytes past its end (a retry overlaps it), up to
 * the limit, where a note says the rest is in task.log. Refuses an append that would leave a gap.
 */
export function planAppend(
  size: number,
  offset: number | undefined,
  bytes: Buffer,
  maxBytes: number,
): { fresh: Buffer } & AppendResult {
  if (bytes.length > MAX_APPEND_BYTES)
    throw new LiveLogError(413, `an append carries at most ${MAX_APPEND_BYTES} bytes, not ${bytes.length}`);
  const at = offset ?? size;
  if (at > size)
    throw new LiveLogError(409, `the log has ${size} bytes: an append at ${at} would leave a gap`);
  const note = Buffer.from(
    `\n[vsp: the live log stops at ${maxBytes} bytes; task.log keeps the whole output]\n`,
  );
  const room = maxBytes - note.length - size;
  if (room < 0) return { fresh: Buffer.alloc(0), size, full: true };
  let fresh = bytes.subarray(size - at);
  const full = fresh.length > room;
  if (full) fresh = Buffer.concat([fresh.subarray(0, room), note]);
  return { fresh, size: size + fresh.length, full };
}

/** Live logs as files under the data dir: one server's (`local`). */
export class LiveLogs implements LiveLogStore {
  private readonly grew = new EventEmitter();
  /** Appends to one file run one at a time (the offset check and the write must not interleave). */
  private readonly queues = new Map<string, Promise<unknown>>();

  constructor(
    private readonly dir: string,
    private readonly maxBytes = DEFAULT_LIVE_LOG_BYTES,
  ) {
    // Every follower of a log listens; there may be many.
    this.grew.setMaxListeners(0);
  }

  static async open(dataDir: string, maxBytes?: number): Promise<LiveLogs> {
    const dir = path.join(dataDir, 'live-logs');
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    return new LiveLogs(dir, maxBytes);
  }

  private file(owner: string, capabilityId: string): string {
    checkCapabilityId(capabilityId);
    return path.join(this.dir, owner, `${capabilityId}.log`);
  }

  async size(owner: string, capabilityId: string): Promise<number> {
    const st = await fs.stat(this.file(owner, capabilityId)).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      throw err;
    });
    return st?.size ?? 0;
  }

  async append(
    owner: string,
    capabilityId: string,
    offset: number | undefined,
    bytes: Buffer,
  ): Promise<AppendResult> {
    const file = this.file(owner, capabilityId);
    const prior = this.queues.get(file) ?? Promise.resolve();
    const run = prior.catch(() => undefined).then(() => this.appendNow(file, offset, bytes));
    this.queues.set(file, run);
    void run
      .finally(() => {
        if (this.queues.get(file) === run) this.queues.delete(file);
      })
      .catch(() => undefined);
    return run;
  }

  private async appendNow(file: string, offset: number | undefined, bytes: Buffer): Promise<AppendResult> {
    await fs.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    const fh = await fs.open(file, 'a', 0o600);
    try {
      const { fresh, ...result } = planAppend((await fh.stat()).size, offset, bytes, this.maxBytes);
      if (fresh.length > 0) {
        await fh.write(fresh);
        this.grew.emit(file);
      }
      return result;
    } finally {
      await fh.close();
    }
  }

  read(owner: string, capabilityId: string, offset: number, max = MAX_APPEND_BYTES): Promise<Buffer> {
    return readRange(this.file(owner, capabilityId), offset, max);
  }

  waitForGrowth(owner: string, capabilityId: string, ms: number, signal: AbortSignal): Promise<void> {
    const file = this.file(owner, capabilityId);
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.grew.off(file, done);
        signal.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.grew.on(file, done);
      signal.addEventListener('abort', done);
    });
  }
}
