import { existsSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { Context } from '@temporalio/activity';
import * as temporalWorker from '@temporalio/worker';
import { FAULT_DIR_ENV, heldFile, holdFile, type HoldPoint } from './faultHoldFiles';

/**
 * Fault injection for the fault suite (test/faults/): preloaded into a worker with `node --require` (the
 * workers never load it themselves), it stops the activities a test names at the point it names until the
 * test releases them (faultHoldFiles.ts), so that a fault hits a task in a known phase with no timing
 * assumption.
 */
const POLL_MS = 50;

async function holdIfAsked(dir: string, point: HoldPoint): Promise<void> {
  const { info } = Context.current();
  const workflowId = info.workflowExecution?.workflowId;
  if (!workflowId) return;
  const hold = holdFile(dir, workflowId, info.activityType, point);
  if (!existsSync(hold)) return;
  writeFileSync(
    heldFile(dir, workflowId, info.activityType, point),
    JSON.stringify({ pid: process.pid, attempt: info.attempt }),
  );
  while (existsSync(hold)) await sleep(POLL_MS);
}

const dir = process.env[FAULT_DIR_ENV];
if (dir) {
  const holds: temporalWorker.ActivityInterceptorsFactory = () => ({
    inbound: {
      async execute(input, next) {
        await holdIfAsked(dir, 'before');
        const result = await next(input);
        await holdIfAsked(dir, 'after');
        return result;
      },
    },
  });
  const create = temporalWorker.Worker.create.bind(temporalWorker.Worker);
  temporalWorker.Worker.create = (options) =>
    create({
      ...options,
      interceptors: { ...options.interceptors, activity: [...(options.interceptors?.activity ?? []), holds] },
    });
}
