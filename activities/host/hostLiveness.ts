import { ApplicationFailure, Context } from '@temporalio/activity';
import { setTimeout as sleep } from 'node:timers/promises';
import { describeError } from '../../logging/logger';
import type { HostInventory } from '../../scheduler/model';

export interface HostLivenessDeps {
  hostName: string;
  /** How often the heartbeat reaches Temporal (the worker's heartbeat throttle is set to the same). */
  heartbeatMs: number;
  /** What the host offers now, sent with every beat (the scheduler reads it with the liveness). */
  inventory: () => Promise<HostInventory>;
}

/** A liveness heartbeat's details: who beats, and the host's inventory (absent if it could not be read). */
export interface LivenessBeat {
  host: string;
  pid: number;
  workerStartedAt: string;
  inventory?: HostInventory;
  inventoryError?: string;
}

/**
 * The host's heartbeat, run by its worker for as long as the worker lives (workflows/hostLiveness.ts).
 * Temporal records each beat as the pending activity's last heartbeat time, without a history event,
 * so the control worker reads a host's liveness and inventory with one describe() call (hostStatus).
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
        const beat: LivenessBeat = { host, pid: process.pid, workerStartedAt: startedAt };
        try {
          beat.inventory = await deps.inventory();
        } catch (err) {
          // Still alive: the beat goes without it, and says why.
          beat.inventoryError = describeError(err);
        }
        ctx.heartbeat(beat);
        await sleep(deps.heartbeatMs, undefined, { signal: ctx.cancellationSignal });
      }
    },
  };
}

export type HostLivenessActivities = ReturnType<typeof createHostLivenessActivities>;
