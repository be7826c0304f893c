import type { TaskStatus } from '../workflows/definitions';

/** What the display shows of a task's status (the owners' task API and the status query both have it). */
export type DisplayedStatus = Partial<
  Pick<TaskStatus, 'phase' | 'host' | 'storageHost' | 'progress' | 'progressMessage' | 'timestamps'>
>;

const ENDED = new Set(['completed', 'failed', 'cancelled']);

/**
 * One line per phase: the current phase's line redrawn in place on a terminal (appended on every change
 * otherwise: logs, CI). Phases that began and ended between two polls (stage-out, destroying) still get
 * their line, from the task's phase timestamps. A completed task shows 100 %.
 */
export function createProgressDisplay(out: NodeJS.WriteStream = process.stderr) {
  const opened = Date.now();
  /** A line is on the terminal, not yet ended. */
  let drawn = false;
  let current: string | undefined;
  /** `phase@time` of every phase given its line: a restarted task's phases come again with new times. */
  const shown = new Set<string>();

  const emit = (line: string, keep: boolean) => {
    if (!out.isTTY) return void out.write(`${line}\n`);
    out.write(`\r\x1b[2K${line.slice(0, (out.columns ?? 120) - 1)}${keep ? '\n' : ''}`);
    drawn = !keep;
  };

  return {
    update(s: DisplayedStatus): void {
      const stamps = Object.entries(s.timestamps ?? {}).sort(([, a], [, b]) => a.localeCompare(b));
      // Seconds since the task began (its first phase), or since the display opened without timestamps.
      const origin = stamps.length ? Math.min(opened, Date.parse(stamps[0][1])) : opened;
      const secs = (at: number) => `${((at - origin) / 1000).toFixed(1).padStart(6)}s  `;
      if (s.phase !== current) {
        if (drawn) out.write('\n');
        drawn = false;
        for (const [phase, at] of stamps)
          if (phase !== s.phase && !shown.has(`${phase}@${at}`)) {
            shown.add(`${phase}@${at}`);
            emit(`${secs(Date.parse(at))}${phase}`, true);
          }
        current = s.phase;
      }
      if (s.phase && s.timestamps?.[s.phase]) shown.add(`${s.phase}@${s.timestamps[s.phase]}`);
      emit(`${secs(Date.now())}${describeStatus(s)}`, s.phase !== undefined && ENDED.has(s.phase));
    },
    done(): void {
      if (drawn) out.write('\n');
      drawn = false;
    },
  };
}

function describeStatus(s: DisplayedStatus): string {
  const where = s.host
    ? ` on ${s.host}${s.storageHost && s.storageHost !== s.host ? ` (disks on ${s.storageHost})` : ''}`
    : '';
  const progress = s.phase === 'completed' ? 100 : s.progress;
  const pct = progress !== undefined ? ` ${bar(progress)} ${progress.toFixed(0)}%` : '';
  const msg = s.progressMessage ? ` ${s.progressMessage}` : '';
  return `${(s.phase ?? '-').padEnd(11)}${where}${pct}${msg}`;
}

function bar(pct: number, width = 20): string {
  const filled = Math.round((Math.max(0, Math.min(100, pct)) / 100) * width);
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
}
