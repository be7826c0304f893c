import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { createLogger, describeError } from '../../logging/logger';
import { RepositoryError } from '../../repository/client';
import { decodeCapabilityClaims } from '../../spec/capability';
import { readRange } from '../../lib/fileRange';
import { replaceFile } from '../../storage/durableFile';
import { MAX_APPEND_BYTES } from '../../repository/tasks/liveLogs';
import type { HostDeps } from './hostDeps';
import { readTaskRecord } from './taskAccess';

const log = createLogger('activities.live-log');

/** How often new output goes to the repository: well inside the 2 s an owner may wait to see a line. */
export const SHIP_INTERVAL_MS = 500;
/** Bytes read per append (the repository takes at most this many; a console line loses bytes, never gains). */
const CHUNK_BYTES = MAX_APPEND_BYTES;
/** The guest prefixes the task's own lines on the console with this (deploy/guest/init). */
const OUTPUT_PREFIX = 'VSP-OUT ';

/** Where shipping stands, kept in the VM folder so a restarted worker neither repeats nor skips bytes. */
interface ShipState {
  /** The local file's inode: a new console (the VM came back to this host) starts again at 0. */
  ino: number;
  /** Bytes of the local file already sent. */
  local: number;
  /** The repository log's size after them (unknown: append at its end). */
  remote?: number;
}

export interface ShipperOptions {
  /** The file the driver writes: the process driver's task.log, a VM's serial console. */
  file: string;
  /** A console: whole lines only, the guest's output prefix taken off. */
  console: boolean;
  stateFile: string;
  append(
    offset: number | undefined,
    bytes: Buffer,
    signal?: AbortSignal,
  ): Promise<{ size: number; full: boolean }>;
}

/**
 * Sends what a running task writes to the repository's live log of its run (liveLogs.ts), every half
 * second, from the host where the VM runs: after a migration the next host goes on from where the log
 * ends. Idempotent: each append names where its bytes go, so a repeated one adds nothing. A failing
 * repository delays the log, never the task.
 */
export class LiveLogShipper {
  private state?: ShipState;
  private full = false;
  private warned = false;

  constructor(private readonly opts: ShipperOptions) {}

  /** Ships until `signal` aborts; errors are logged and tried again. */
  async run(signal: AbortSignal): Promise<void> {
    while (!signal.aborted && !this.full) {
      await this.ship(false, signal).catch((err: unknown) => signal.aborted || this.failed(err));
      await sleep(SHIP_INTERVAL_MS, undefined, { signal }).catch(() => undefined);
    }
  }

  /** Ships what is there now; `final` sends a last line that has no newline yet too. */
  async ship(final: boolean, signal?: AbortSignal): Promise<void> {
    const st = await fs.stat(this.opts.file).catch(() => undefined);
    if (!st) return;
    let state = (this.state ??= await this.loadState());
    if (state.ino !== st.ino || st.size < state.local) state = this.state = { ino: st.ino, local: 0 };
    while (!this.full && st.size > state.local) {
      // Where the log ends, learnt first (an empty append): every append of bytes then names its
      // offset, so one repeated after a lost reply adds nothing.
      if (state.remote === undefined) {
        const end = await this.opts.append(undefined, Buffer.alloc(0), signal);
        state = this.state = { ...state, remote: end.size };
        this.full = end.full;
        // Kept before any byte goes: an attempt that starts meanwhile maps this file to the same place.
        await this.save();
        continue;
      }
      const raw = await readRange(this.opts.file, state.local, CHUNK_BYTES);
      if (raw.length === 0) return;
      const { consumed, bytes } = this.opts.console
        ? consoleText(raw, final)
        : { consumed: raw.length, bytes: raw };
      if (consumed === 0) return;
      let sent;
      try {
        sent = await this.opts.append(state.remote, bytes, signal);
      } catch (err) {
        // The repository's log is shorter than this host believed (a gap): go on from its end.
        if (err instanceof RepositoryError && err.status === 409) {
          state = this.state = { ...state, remote: undefined };
          continue;
        }
        throw err;
      }
      state = this.state = { ino: st.ino, local: state.local + consumed, remote: sent.size };
      this.full = sent.full;
      await this.save();
      this.warned = false;
    }
  }

  private async save(): Promise<void> {
    await replaceFile(this.opts.stateFile, JSON.stringify(this.state), 0o600);
  }

  private async loadState(): Promise<ShipState> {
    try {
      return JSON.parse(await fs.readFile(this.opts.stateFile, 'utf8')) as ShipState;
    } catch {
      return { ino: -1, local: 0 };
    }
  }

  private failed(err: unknown): void {
    // Once per outage: a repository away for minutes must not flood the worker's log.
    if (this.warned) return;
    this.warned = true;
    log.warn({ file: this.opts.file, err: describeError(err) }, 'live log not sent; trying again');
  }
}

/**
 * The console's whole lines in `raw` as an owner reads them: the task's own lines without the guest's
 * prefix, the rest (kernel, guest init) as they are, no carriage returns. A last line without its
 * newline waits for it, unless `final` or the chunk is one long line.
 */
export function consoleText(raw: Buffer, final: boolean): { consumed: number; bytes: Buffer } {
  const lastNewline = raw.lastIndexOf(0x0a);
  const consumed = final || (lastNewline < 0 && raw.length >= CHUNK_BYTES) ? raw.length : lastNewline + 1;
  const text = raw
    .subarray(0, consumed)
    .toString('utf8')
    .split('\n')
    .map((line) => {
      const l = line.replace(/\r$/, '');
      return l.startsWith(OUTPUT_PREFIX) ? l.slice(OUTPUT_PREFIX.length) : l;
    })
    .join('\n');
  return { consumed, bytes: Buffer.from(text) };
}

/** How long the last piece of a task's live log may take to send as its wait ends. */
const FINAL_SHIP_MS = 5000;

/**
 * Starts shipping the live log of the VM that runs here, presenting its task's capability (from the VM
 * folder's task record, checked to be this workflow's and owner's); nothing when the folder has no
 * usable record. Returns how to stop: the last bytes go then, within FINAL_SHIP_MS.
 */
export async function shipLiveLog(
  deps: Pick<HostDeps, 'store' | 'repositoryFor'>,
  vmId: string,
  workflowId: string,
  isolation: 'process' | 'vm',
): Promise<() => Promise<void>> {
  const { store } = deps;
  const record = await readTaskRecord(store, vmId).catch(() => undefined);
  if (!record?.capability) return async () => undefined;
  try {
    const claims = decodeCapabilityClaims(record.capability);
    if (claims.taskId !== workflowId || claims.owner !== record.owner) return async () => undefined;
  } catch (err) {
    log.warn({ vmId, err: describeError(err) }, 'no live log: the task record holds no usable capability');
    return async () => undefined;
  }
  const repository = deps.repositoryFor(record.capability);
  const p = store.paths(vmId);
  const shipper = new LiveLogShipper({
    file: isolation === 'process' ? p.taskLog : p.consoleLog,
    console: isolation !== 'process',
    stateFile: path.join(p.dir, 'live-log.json'),
    append: (offset, bytes, signal) =>
      repository.appendTaskLog(record.owner, record.taskId, offset, bytes, signal),
  });
  const shipping = new AbortController();
  const running = shipper.run(shipping.signal);
  return async () => {
    shipping.abort();
    await running;
    // Bounded: a repository that is away delays the task's end by this much at most.
    await shipper
      .ship(true, AbortSignal.timeout(FINAL_SHIP_MS))
      .catch((err: unknown) =>
        log.warn({ vmId, err: describeError(err) }, 'the end of the live log was not sent'),
      );
  };
}
