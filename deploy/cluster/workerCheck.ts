import { Connection } from '@temporalio/client';
import { temporal } from '@temporalio/proto';

/**
 * The last check of a deploy: Temporal sees the host's new worker polling its task queue. The worker's
 * identity carries its process id (workers/hostWorker.ts), so a poller left listed by the worker it
 * replaced does not count.
 */

export interface PollerCheck {
  /** Resolves with the matching poller's identity; rejects when `timeoutMs` passes without one. */
  waitForPoller(taskQueue: string, identityPrefix: string, timeoutMs: number): Promise<string>;
  close(): Promise<void>;
}

export async function connectPollerCheck(address: string, namespace: string): Promise<PollerCheck> {
  let connection: Connection;
  try {
    connection = await Connection.connect({ address, connectTimeout: 10_000 });
  } catch (err) {
    throw new Error(`cannot reach Temporal at ${address} from this machine`, { cause: err });
  }
  const identities = async (taskQueue: string): Promise<string[]> => {
    const r = await connection.workflowService.describeTaskQueue({
      namespace,
      taskQueue: { name: taskQueue, kind: temporal.api.enums.v1.TaskQueueKind.TASK_QUEUE_KIND_NORMAL },
      // Host workers run activities only.
      taskQueueType: temporal.api.enums.v1.TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
    });
    return (r.pollers ?? []).map((p) => p.identity ?? '');
  };
  return {
    async waitForPoller(taskQueue, identityPrefix, timeoutMs) {
      const deadline = Date.now() + timeoutMs;
      let seen: string[] = [];
      for (;;) {
        seen = await identities(taskQueue);
        const match = seen.find((i) => i.startsWith(identityPrefix));
        if (match) return match;
        if (Date.now() > deadline)
          throw new Error(
            `no poller ${identityPrefix}* on task queue ${taskQueue} after ${Math.round(timeoutMs / 1000)} s (pollers: ${seen.join(', ') || 'none'})`,
          );
        await new Promise((r) => setTimeout(r, 1000));
      }
    },
    close: () => connection.close(),
  };
}
