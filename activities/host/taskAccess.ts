import { promises as fs } from 'node:fs';
import path from 'node:path';
import { ApplicationFailure } from '@temporalio/activity';
import type { RepositoryClient } from '../../repository/client';
import { decodeCapabilityClaims } from '../../spec/capability';
import { writeFileAtomic } from '../../storage/durableFile';
import type { VmStore } from '../../storage/vmStore';
import type { TaskRef } from '../types';

/**
 * The repository as one task may use it: with the task's own capability as the bearer, so a host can
 * read and write only what that task may. The claims are checked first (the repository verifies the
 * signature): a capability minted for another task or owner is refused before any byte moves.
 */
export function taskRepository(
  ref: TaskRef,
  workflowId: string,
  repositoryFor: (capability: string) => RepositoryClient,
): RepositoryClient {
  const mismatch = (why: string) => ApplicationFailure.nonRetryable(why, 'CapabilityMismatch');
  let claims;
  try {
    claims = decodeCapabilityClaims(ref.capability);
  } catch (err) {
    throw mismatch(`task ${workflowId}'s capability is malformed: ${(err as Error).message}`);
  }
  if (claims.taskId !== workflowId)
    throw mismatch(`the capability was minted for task '${claims.taskId}', not for task '${workflowId}'`);
  if (claims.owner !== ref.spec.owner)
    throw mismatch(
      `the capability was minted for owner '${claims.owner}', but task ${workflowId} belongs to '${ref.spec.owner}'`,
    );
  return repositoryFor(ref.capability);
}

/**
 * What a VM folder says about its task (`task.json`, readable by the worker only: it holds the
 * capability): the orphan reaper asks Temporal about this run, and uploads the logs of a VM whose run
 * ended with the capability if it still works.
 */
export interface TaskRecord {
  v: 1;
  taskId: string;
  runId: string;
  owner: string;
  resultsPath: string;
  outputDir: string;
  driver?: string;
  capability?: string;
}

const RECORD_FILE = 'task.json';

export function taskRecordOf(ref: TaskRef, runId: string, driver?: string): TaskRecord {
  return {
    v: 1,
    taskId: ref.taskId,
    runId,
    owner: ref.spec.owner,
    resultsPath: ref.resultsPath,
    outputDir: ref.spec.outputDir,
    ...(driver ? { driver } : {}),
    capability: ref.capability,
  };
}

/** Written once per VM folder (atomically, mode 0600) before the task's first file lands there. */
export async function saveTaskRecord(store: VmStore, vmId: string, record: TaskRecord): Promise<void> {
  const dir = store.paths(vmId).dir;
  await fs.mkdir(dir, { recursive: true });
  // Durable: a host that loses power right after must not come back with an empty record (seen on a Xen
  // dom0 cut mid-migration), which would leave its VM folder unidentifiable.
  await writeFileAtomic(path.join(dir, RECORD_FILE), JSON.stringify(record), 0o600);
}

export async function readTaskRecord(store: VmStore, vmId: string): Promise<TaskRecord | undefined> {
  try {
    return JSON.parse(await fs.readFile(path.join(store.paths(vmId).dir, RECORD_FILE), 'utf8')) as TaskRecord;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}
