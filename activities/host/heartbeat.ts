import { Context } from '@temporalio/activity';

/** Timer heartbeats of long steps; the workflow's heartbeat timeouts are several times this. */
export const HEARTBEAT_MS = 2000;
/** Byte progress heartbeats at most this often (the SDK throttles what reaches the server anyway). */
const PROGRESS_BEAT_MS = 500;

/**
 * The heartbeats of one long activity: from a timer, so a step that shows no progress of its own
 * (mke2fs, a stalled download, a QMP call) still proves its worker alive, and from byte progress, both
 * with the latest details. A retried attempt reads the last details back (`previous`) to resume.
 */
export class Heartbeat {
  private details: Record<string, unknown>;
  private last = 0;

  constructor(
    private readonly ctx: Context,
    details: Record<string, unknown>,
  ) {
    this.details = details;
  }

  /** What the previous attempt of this activity last reported, if any. */
  previous<T>(): T | undefined {
    return this.ctx.info.heartbeatDetails as T | undefined;
  }

  /** Stops downloads and tools when the activity is cancelled (or its attempt timed out). */
  get signal(): AbortSignal {
    return this.ctx.cancellationSignal;
  }

  /**
   * Replaces some details; heartbeats now unless one went out a moment ago. A milestone (what a retry
   * resumes from) always goes out at once.
   */
  update(details: Record<string, unknown>, milestone = false): void {
    this.details = { ...this.details, ...details };
    if (milestone || Date.now() - this.last >= PROGRESS_BEAT_MS) this.beat();
  }

  /** Byte progress of a transfer, as details `{bytes, total}`. */
  readonly onBytes = (bytes: number, total: number | undefined): void =>
    this.update({ bytes, ...(total === undefined ? {} : { total }) });

  beat(): void {
    this.last = Date.now();
    this.ctx.heartbeat(this.details);
  }
}

/** Runs `work` with a Heartbeat that also beats from a timer until `work` settles. */
export async function heartbeating<T>(
  details: Record<string, unknown>,
  work: (hb: Heartbeat) => Promise<T>,
): Promise<T> {
  const hb = new Heartbeat(Context.current(), details);
  hb.beat();
  const timer = setInterval(() => hb.beat(), HEARTBEAT_MS);
  try {
    return await work(hb);
  } finally {
    clearInterval(timer);
  }
}
