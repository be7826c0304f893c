import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import {
  setUpTemporalSchema,
  startTemporalPgServer,
  temporalSqlEnv,
  type TemporalPgServer,
} from '../../deploy/temporal/server';
import { SchedulerClient } from '../../client/schedulerClient';
import { runCommand } from '../../lib/runCommand';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';
import { startPostgres, type TestDatabase } from '../support/postgres';
import { releaseTask, waitingCommand, waitingTaskDir } from '../support/releasedTasks';
import { testLogDir } from '../support/testRun';

/**
 * The real Temporal server (deploy/temporal/: SQL persistence and SQL visibility on PostgreSQL) under the
 * task lifecycle, with the project's namespace and search attributes registered by the deploy code, and
 * the server killed and restarted under a running task.
 */
const NAMESPACE = 'vsp';
const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

let persistence: TestDatabase | undefined;
let visibility: TestDatabase | undefined;
let sqlEnv: NodeJS.ProcessEnv;
let server: TemporalPgServer | undefined;
let fx: ClusterFixture | undefined;
let tmp: string;
const logFile = path.join(testLogDir(), `temporal-pg-${process.pid}.log`);
const timingsMs: Record<string, number> = {};

async function timed<T>(what: string, step: () => Promise<T>): Promise<T> {
  const start = Date.now();
  const result = await step();
  timingsMs[what] = Date.now() - start;
  return result;
}

/** psql against one of the test databases: what Temporal wrote there. */
async function sql(url: string, query: string): Promise<string> {
  return (await runCommand('psql', ['-w', url, '-v', 'ON_ERROR_STOP=1', '-qtAc', query])).stdout.trim();
}

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-temporal-pg-'));
  [persistence, visibility] = await timed('postgres', () => Promise.all([startPostgres(), startPostgres()]));
  sqlEnv = temporalSqlEnv(persistence.url, visibility.url);
  await timed('schema', () => setUpTemporalSchema(sqlEnv));
  await timed('schemaAgain', () => setUpTemporalSchema(sqlEnv));
  server = await timed('serverStart', () => startTemporalPgServer({ sqlEnv, namespace: NAMESPACE, logFile }));
  fx = await startClusterFixture({
    hosts: ['a', 'b'],
    owners: ['alice'],
    temporalAddress: server.address,
    temporalNamespace: NAMESPACE,
  });
}, 400_000);

afterAll(async () => {
  await fx?.stop();
  await server?.stop();
  await visibility?.stop();
  await persistence?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
  process.stderr.write(`Temporal on PostgreSQL timings (ms): ${JSON.stringify(timingsMs)}\n`);
});

function cluster(): ClusterFixture {
  if (!fx) throw new Error('the cluster did not start (see beforeAll)');
  return fx;
}

test('a task runs end to end on Temporal on PostgreSQL: outputs stored, listed through SQL visibility', async () => {
  const input = path.join(tmp, 'in.txt');
  await fs.writeFile(input, 'on postgres\n');
  await cluster().repo('alice').upload('alice', 'in/in.txt', input);
  const { taskId } = await cluster().cluster.submitTask('alice', {
    driver: 'process',
    inputs: ['in/in.txt'],
    command: 'mkdir -p out && tr a-z A-Z < in/in.txt > out/upper.txt && echo VSP-PROGRESS 100 done',
  });
  const result = await cluster().vsp.result(taskId);
  expect(result.exitCode).toBe(0);
  expect(result.outputs.find((o) => o.path.endsWith('outputs/upper.txt'))?.sha256).toBe(
    sha256('ON POSTGRES\n'),
  );
  // VSP's search attributes, upserted by the workflow, queried through the SQL visibility store.
  const listed = await until('the completed task in visibility', async () =>
    (await cluster().vsp.list({ owner: 'alice' })).find(
      (t) => t.taskId === taskId && t.phase === 'completed',
    ),
  );
  expect(listed.host).toBe(result.host);
  // The history and the visibility row are PostgreSQL's.
  expect(Number(await sql(persistence!.url, 'SELECT count(*) FROM executions'))).toBeGreaterThan(0);
  expect(
    await sql(visibility!.url, `SELECT status FROM executions_visibility WHERE workflow_id = '${taskId}'`),
  ).toBe('2'); // WORKFLOW_EXECUTION_STATUS_COMPLETED
});

test('the Temporal server killed mid-task and restarted on the same databases: the task completes once', async () => {
  const marker = `vsp-pg-${Date.now()}`;
  // The task names host a: the scheduler must have heard from it (a host reports within a heartbeat).
  const scheduler = new SchedulerClient(cluster().temporal);
  await until('host a to report its inventory', async () => {
    const state = await scheduler.state({ fresh: true }).catch(() => undefined);
    return state?.hosts.some((h) => h.host === 'a' && h.state === 'ready') || undefined;
  });
  const { taskId } = await cluster().cluster.submitTask('alice', {
    driver: 'process',
    host: 'a',
    // Waits for its release, given only after the restart: the kill always lands mid-task.
    command: `mkdir -p out && echo run >> out/runs.txt && ${waitingCommand(marker, 'echo finished >> out/runs.txt')}`,
  });
  await until('the task to wait for its release', () =>
    waitingTaskDir(cluster().cluster.storeDir('a'), marker),
  );
  const first = server!;
  await first.kill();
  expect(await first.exited).toBeNull(); // SIGKILL: no graceful hand-over of shards
  server = await timed('serverRestart', () =>
    startTemporalPgServer({ sqlEnv, namespace: NAMESPACE, port: first.port, logFile }),
  );
  expect(server.address).toBe(first.address);
  await releaseTask(cluster().cluster.storeDir('a'), marker);
  const result = await cluster().vsp.result(taskId);
  expect(result.exitCode).toBe(0);
  expect(result.outputs.find((o) => o.path.endsWith('outputs/runs.txt'))?.sha256).toBe(
    sha256('run\nfinished\n'),
  );
}, 400_000);
