import { ApplicationFailure, Context } from '@temporalio/activity';
import { setTimeout as sleep } from 'node:timers/promises';

export interface HostLivenessDeps {
  hostName: string;
  /** How often the heartbeat reaches Temporal (the worker's heartbeat throttle is set to the same). */
  heartbeatMs: number;
}

/**
 * The host's heartbeat, run by its worker for as long as the worker lives (workflows/hostLiveness.ts).
 * Temporal records each beat as the pending activity's last heartbeat time, without a history event,
 * so the control worker reads a host's liveness with one describe() call (hostStatus).
 */
export function createHostLivenessActivities(deps: HostLivenessDeps) {
  const startedAt = new Date().toISOString();
  return {
    async hostHeartbeat(host: string): Promise<void> {
      if (host !== deps.hostName)
        throw ApplicationFailure.nonRetryable(
          `host ${deps.hostName} was asked to heartbeat for host ${host}`,
          'WrongHost',
        );
      const ctx = Context.current();
      // Until the worker dies or the attempt times out: never a completion, so never a moment without a
      // pending heartbeat (the last heartbeat time survives into the next attempt).
      for (;;) {
        ctx.heartbeat({ host, pid: process.pid, workerStartedAt: startedAt });
        await sleep(deps.heartbeatMs, undefined, { signal: ctx.cancellationSignal });
      }
    },
  };
}

export type HostLivenessActivities = ReturnType<typeof createHostLivenessActivities>;
