import { createLogger, describeError } from '../../logging/logger';
import type { HostDeps } from './hostDeps';

const log = createLogger('activities.progress');

/** Progress reaches the workflow each time it crosses a step of this many percent: a few signals a task. */
export const PROGRESS_STEP = 10;

/**
 * The progress reports of one task's wait, passed on to its workflow when they reach a new step (each
 * signal adds a few history events; every report still goes out in the heartbeats). `from` is the
 * progress the workflow already had (a retried wait). A failed signal is logged: the next step retries.
 */
export function progressSteps(
  taskId: string | undefined,
  report: HostDeps['reportProgress'],
  from?: number,
): (progress: number | undefined, message: string | undefined) => void {
  const stepOf = (p: number) => Math.floor(p / PROGRESS_STEP);
  let sent = from === undefined ? undefined : stepOf(from);
  return (progress, message) => {
    if (!report || !taskId || progress === undefined || stepOf(progress) === sent) return;
    sent = stepOf(progress);
    report(taskId, { progress, message }).catch((err: unknown) => {
      sent = undefined;
      log.warn({ taskId, err: describeError(err) }, 'could not tell the workflow its progress');
    });
  };
}
