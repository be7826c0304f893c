import type { TaskPhase, TaskStatus } from '../workflows/definitions';

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
  /** The current phase's status and when it began (its line is redrawn until the phase changes). */
  let current: { s: DisplayedStatus; start: number } | undefined;
  /** `phase@time` of every phase given its line: a restarted task's phases come again with new times. */
  const shown = new Set<string>();

  const emit = (line: string, keep: boolean) => {
    if (!out.isTTY) return void out.write(`${line}\n`);
    out.write(`\r\x1b[2K${line.slice(0, (out.columns ?? 120) - 1)}${keep ? '\n' : ''}`);
    drawn = !keep;
  };

  return {
    update(s: DisplayedStatus): void {
      const stamps = Object.entries(s.timestamps ?? {})
        .map(([phase, at]) => [phase, Date.parse(at), at] as const)
        .sort((a, b) => a[1] - b[1]);
      // Seconds since the task began (its first phase), or since the display opened without timestamps.
      const origin = stamps.length ? Math.min(opened, stamps[0][1]) : opened;
      // Each line is timed by when its phase began; a current phase says how long it has lasted.
      const line = (c: { s: DisplayedStatus; start: number }, lasted: string) =>
        `${((c.start - origin) / 1000).toFixed(1).padStart(6)}s  ${describeStatus(c.s)}${lasted}`;
      const seconds = (ms: number) => `  (${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)} s)`;
      if (s.phase !== current?.s.phase) {
        // The phase that ended: its line, still under the cursor on a terminal, gets its whole duration.
        if (drawn && current) {
          const next = stamps.find(([, at]) => at > (current as { start: number }).start)?.[1] ?? Date.now();
          emit(line(current, seconds(next - current.start)), true);
        }
        for (const [phase, at, iso] of stamps)
          if (phase !== s.phase && !shown.has(`${phase}@${iso}`)) {
            shown.add(`${phase}@${iso}`);
            emit(line({ s: { phase: phase as TaskPhase }, start: at }, ''), true);
          }
      }
      const began = s.phase && s.timestamps?.[s.phase];
      if (began) shown.add(`${s.phase}@${began}`);
      current = { s, start: began ? Date.parse(began) : Date.now() };
      const ended = s.phase !== undefined && ENDED.has(s.phase);
      emit(line(current, ended ? '' : `${seconds(Date.now() - current.start)} so far`), ended);
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
