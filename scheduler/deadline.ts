import type { CpuShare } from '../drivers/types';

/** Percentage points of progress a task may lag the time it has used before it counts as behind. */
export const BEHIND_MARGIN = 5;
/** A task behind its deadline gets its cap lifted and this many times its weight. */
export const BEHIND_WEIGHT_FACTOR = 4;
const MAX_WEIGHT = 10_000;

export interface DeadlineVerdict {
  /** Progress the task should have reached by now (0..100) to finish on time at an even pace. */
  expected: number;
  behind: boolean;
  /** The share it should have now: the one asked for, or raised when it is behind. */
  share: CpuShare;
}

/**
 * Whether a task with a deadline is behind, and the share that follows: it should have done the share
 * of its work that it has used of the time between its start and its deadline. A task that reports no
 * progress is never judged behind (nothing says so).
 */
export function deadlineShare(
  requested: CpuShare,
  progress: number | undefined,
  startMs: number,
  deadlineMs: number,
  nowMs: number,
): DeadlineVerdict {
  const span = deadlineMs - startMs;
  const expected = span <= 0 ? 100 : Math.min(100, Math.max(0, ((nowMs - startMs) / span) * 100));
  const behind = progress !== undefined && progress < 100 && progress + BEHIND_MARGIN < expected;
  if (!behind) return { expected, behind, share: requested };
  return {
    expected,
    behind,
    share: { weight: Math.min(MAX_WEIGHT, (requested.weight ?? 100) * BEHIND_WEIGHT_FACTOR) },
  };
}
