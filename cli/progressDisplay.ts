import type { TaskStatus } from '../workflows/definitions';

/** What the display shows of a task's status (the owners' task API and the status query both have it). */
export type DisplayedStatus = Partial<
  Pick<TaskStatus, 'phase' | 'host' | 'storageHost' | 'progress' | 'progressMessage'>
>;

/** One line per status: redrawn in place on a terminal, appended otherwise (logs, CI). */
export function createProgressDisplay(out: NodeJS.WriteStream = process.stderr) {
  const started = Date.now();
  let drawn = false;
  return {
    update(s: DisplayedStatus): void {
      const secs = ((Date.now() - started) / 1000).toFixed(1).padStart(6);
      const where = s.host
        ? ` on ${s.host}${s.storageHost && s.storageHost !== s.host ? ` (disks on ${s.storageHost})` : ''}`
        : '';
      const pct = s.progress !== undefined ? ` ${bar(s.progress)} ${s.progress.toFixed(0)}%` : '';
      const msg = s.progressMessage ? ` ${s.progressMessage}` : '';
      const line = `${secs}s  ${(s.phase ?? '-').padEnd(11)}${where}${pct}${msg}`;
      if (out.isTTY) {
        out.write(`\r\x1b[2K${line.slice(0, (out.columns ?? 120) - 1)}`);
        drawn = true;
      } else out.write(`${line}\n`);
    },
    done(): void {
      if (drawn) out.write('\n');
    },
  };
}

function bar(pct: number, width = 20): string {
  const filled = Math.round((Math.max(0, Math.min(100, pct)) / 100) * width);
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
}
