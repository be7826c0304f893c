import type { MigrationProgress, MigrationResult } from '../types';

const MAX_PROBLEMS = 8;

/**
 * What `xl -vvv migrate` tells about a live migration as it runs, read from its stderr line by line (the
 * target's lines come through ssh), plus the bytes of the memory stream (xl prints no byte counts; the
 * driver samples the save helper's writes, see `xl.ts`). Downtime: from libxl's suspend request to the
 * guest here to the target's "Domain started", both timed as they arrive (ssh adds its latency to the
 * second, and the guest runs a little after the request: an upper bound). Without the stream bytes, the domain's memory stands in (pre-copy sends
 * every page at least once: a lower bound).
 */
export class MigrateOutput {
  private readonly started: number;
  private streamBytes = 0;
  private suspendedAt?: number;
  private resumedAt?: number;
  private ended?: number;
  private phase: 'setup' | 'active' | 'device' | 'completed' = 'setup';
  /** The lines that say what went wrong, without libxl's debug chatter (xl -vvv prints hundreds). */
  private readonly problems: string[] = [];

  constructor(
    private readonly memoryBytes: number,
    private readonly now: () => number = Date.now,
  ) {
    this.started = now();
  }

  add(line: string): void {
    const at = this.now();
    const said = line.trim();
    if (
      !/\bdebug: /.test(said) &&
      /error|fail|timeout|not responding|refused|denied|no route|closed/i.test(said) &&
      !this.problems.includes(said) &&
      this.problems.length < MAX_PROBLEMS
    )
      this.problems.push(said);
    if (/issuing .*suspend request|guest has suspended/.test(line)) {
      this.suspendedAt ??= at;
      this.phase = 'device';
    } else if (/^migration target: Domain started/.test(line)) {
      this.resumedAt ??= at;
    } else if (/^migration target: Ready to receive domain/.test(line) && this.phase === 'setup') {
      this.phase = 'active';
    }
  }

  /** Why a failed migration failed, in xl's own words (its error lines, in order): one line, if it said. */
  failure(): string | undefined {
    return this.problems.length > 0 ? this.problems.join('; ') : undefined;
  }

  /** The bytes of the migration stream written so far (it only grows). */
  sent(bytes: number): void {
    this.streamBytes = Math.max(this.streamBytes, bytes);
  }

  completed(): void {
    this.phase = 'completed';
    this.ended = this.now();
  }

  private sentBytes(): number {
    if (this.streamBytes > 0) return this.streamBytes;
    return this.phase === 'completed' ? this.memoryBytes : 0;
  }

  progress(): MigrationProgress {
    const sent = this.sentBytes();
    return {
      status: this.phase,
      transferredBytes: sent,
      remainingBytes: this.phase === 'completed' ? 0 : Math.max(0, this.memoryBytes - sent),
      totalBytes: this.memoryBytes,
      elapsedMs: this.now() - this.started,
    };
  }

  figures(): Pick<MigrationResult, 'totalTimeMs' | 'downtimeMs' | 'ramTransferredBytes'> {
    const end = this.ended ?? this.now();
    const downtimeMs =
      this.suspendedAt !== undefined && this.resumedAt !== undefined
        ? Math.max(0, this.resumedAt - this.suspendedAt)
        : 0;
    return { totalTimeMs: end - this.started, downtimeMs, ramTransferredBytes: this.sentBytes() };
  }
}
