/**
 * Tasks report progress by printing `VSP-PROGRESS <0-100> [message]` on their output; drivers read the
 * last such line from the tail of a log (the task log for processes, the serial console for VMs).
 */
const PROGRESS_LINE = /^VSP-PROGRESS\s+(\d{1,3}(?:\.\d+)?)(?:\s+(.*))?$/;

export interface Progress {
  progress: number;
  message?: string;
}

/** The report a `VSP-PROGRESS` line makes (undefined: not such a line); above 100 counts as 100. */
export function progressLine(line: string): Progress | undefined {
  const m = PROGRESS_LINE.exec(line.trim());
  return m ? { progress: Math.min(100, Number(m[1])), message: m[2]?.slice(0, 200) } : undefined;
}

export function lastProgress(text: string): Progress | undefined {
  const lines = text.split('\n');
  for (let i = lines.length - 1; i >= 0; i--) {
    const p = progressLine(lines[i]);
    if (p) return p;
  }
  return undefined;
}
