import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Client, WorkflowHandleWithFirstExecutionRunId } from '@temporalio/client';
import type { TestWorkflowEnvironment } from '@temporalio/testing';
import { Worker, type WorkflowBundle } from '@temporalio/worker';
import * as proto from '@temporalio/proto';
import { patchProtobufRoot } from '@temporalio/proto/lib/patch-protobuf-root';
import { resolveTemporalCli } from '../../../deploy/devcluster/tools';

/**
 * A history as `temporal workflow show -o json` writes it, as the SDK's History. Like the SDK's
 * historyFromJSON, but with the protobufjs copy that @temporalio/proto's types come from: npm nests one
 * copy under @temporalio/common and another under @temporalio/proto (the top level holds grpc's older
 * major), and the SDK's helper then fails with "type must be a Type".
 */
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { fromJson } = require(
  require.resolve('protobufjs/ext/protojson', {
    paths: [path.dirname(require.resolve('@temporalio/proto/package.json'))],
  }),
) as {
  fromJson: (type: unknown, json: unknown, opts: object) => proto.temporal.api.history.v1.History | null;
};

const execFileAsync = promisify(execFile);

const historyType = (patchProtobufRoot(proto) as unknown as { lookupType(n: string): unknown }).lookupType(
  'temporal.api.history.v1.History',
);

export function historyFromFixture(json: unknown): proto.temporal.api.history.v1.History {
  const history = fromJson(historyType, json, { ignoreUnknownFields: true });
  if (!history) throw new TypeError('not a workflow history');
  return history;
}

/** Every run's id of a workflow, first to last (following continue-as-new). */
export async function runIds(client: Client, h: WorkflowHandleWithFirstExecutionRunId): Promise<string[]> {
  const out: string[] = [];
  for (let runId: string | null | undefined = h.firstExecutionRunId; runId;) {
    out.push(runId);
    const history = await client.workflow.getHandle(h.workflowId, runId).fetchHistory();
    runId = history.events?.at(-1)?.workflowExecutionContinuedAsNewEventAttributes?.newExecutionRunId;
  }
  return out;
}

/**
 * With VSP_RECORD_HISTORIES=1, writes each run's history to `dir` as the Temporal CLI shows it
 * (`temporal workflow show -o json`, the replay fixture format): `<name>.json`, or `<name>-run<i>.json`.
 */
export async function recordHistory(
  env: TestWorkflowEnvironment,
  dir: string,
  name: string,
  h: WorkflowHandleWithFirstExecutionRunId,
): Promise<void> {
  if (process.env.VSP_RECORD_HISTORIES !== '1') return;
  await fs.mkdir(dir, { recursive: true });
  const runs = await runIds(env.client, h);
  for (const [i, runId] of runs.entries()) {
    const file = path.join(dir, runs.length > 1 ? `${name}-run${i + 1}.json` : `${name}.json`);
    const { stdout } = await execFileAsync(resolveTemporalCli(), [
      'workflow',
      'show',
      '-w',
      h.workflowId,
      '-r',
      runId,
      '--address',
      env.address,
      '-o',
      'json',
    ]);
    await fs.writeFile(file, stdout);
  }
}

/** Replays every history in `files` (under `dir`) against `bundle`: the failures, one line each. */
export async function replayFailures(
  dir: string,
  files: string[],
  bundle: WorkflowBundle,
): Promise<string[]> {
  const histories = await Promise.all(
    files.map(async (f) => ({
      workflowId: f,
      history: historyFromFixture(JSON.parse(await fs.readFile(path.join(dir, f), 'utf8'))),
    })),
  );
  const failures: string[] = [];
  for await (const r of Worker.runReplayHistories({ workflowBundle: bundle }, histories))
    if (r.error) failures.push(`${r.workflowId}: ${r.error.message}`);
  return failures;
}
