import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Client, Connection } from '@temporalio/client';
import { VspClient } from '../client/vspClient';
import { addOwner } from '../repository/accounts/admin';
import { loadCapabilityKeys } from '../repository/accounts/capabilities';
import { MetadataDb } from '../repository/store/metadataDb';
import { localMetadata } from '../repository/store/metadataStore';
import { startRepositoryServer } from '../repository/server';
import { admitTask } from '../repository/tasks/taskAdmission';
import { taskApiOver } from '../repository/http/taskApi';
import type { BenchReport } from './report';

/**
 * Task submission latency before and after pre-flight, in one run against a real repository and Temporal
 * server (no workers: a started task stays where it was started, and is terminated at the end):
 *  - before: what submission cost without admission: validate the spec and start the workflow
 *    (`VspClient.submit` with the capability, as the task API calls it);
 *  - after: the owners' path, `POST /v1/owners/<o>/tasks` over HTTP: authenticate, pre-flight, mint and
 *    record the capability, start the workflow;
 *  - admission alone: the pre-flight and the capability, in process.
 * The modes alternate, so load on the shared machine falls on both alike.
 */

const INPUTS = 8;
/** Files already in the owner's space, so the pre-flight's lookups are not against an empty table. */
const STORED_FILES = 2000;

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

function stats(ms: number[]): { median: number; p95: number } {
  const s = [...ms].sort((a, b) => a - b);
  return { median: percentile(s, 50), p95: percentile(s, 95) };
}

export async function benchSubmission(env: {
  temporalAddress: string;
  quick: boolean;
}): Promise<BenchReport> {
  const runs = env.quick ? 10 : 50;
  const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-bench-submit-'));
  const connection = await Connection.connect({ address: env.temporalAddress });
  const temporal = new Client({ connection, namespace: 'default' });
  const vsp = new VspClient(temporal);
  const started: string[] = [];
  const { token } = await addOwner(dataDir, 'alice');
  const sqlite = MetadataDb.open(dataDir);
  const db = localMetadata(sqlite);
  try {
    const mtime = new Date().toISOString();
    sqlite.transaction(() => {
      for (let i = 0; i < STORED_FILES; i++)
        sqlite.upsertFile('alice', { path: `data/f${i}.bin`, size: 1024, sha256: '0'.repeat(64), mtime });
    });
    const keys = loadCapabilityKeys(dataDir);
    const server = await startRepositoryServer({ dataDir, port: 0, tasks: taskApiOver(vsp) });
    const spec = (i: string) => ({
      name: 'bench',
      command: 'true',
      inputs: Array.from(
        { length: INPUTS },
        (_, k) => `data/f${(Number(i.slice(1)) * INPUTS + k) % STORED_FILES}.bin`,
      ),
    });
    const before: number[] = [];
    const after: number[] = [];
    const admission: number[] = [];
    const run = Date.now().toString(36);
    try {
      for (let i = 0; i < runs; i++) {
        // before: validation and the workflow start only
        const direct = await admitTask(
          { db, keys },
          { owner: 'alice', spec: spec(`b${i}`), taskId: `bench-b-${run}-${i}`, mintedBy: 'bench' },
        );
        let t = performance.now();
        await vsp.submit(direct.input, { taskId: direct.taskId, capability: direct.capability });
        before.push(performance.now() - t);
        started.push(direct.taskId);

        // after: the owners' front door over HTTP
        const taskId = `bench-a-${run}-${i}`;
        t = performance.now();
        const res = await fetch(`${server.url}/v1/owners/alice/tasks`, {
          method: 'POST',
          headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
          body: JSON.stringify({ spec: spec(`a${i}`), taskId }),
        });
        await res.text();
        after.push(performance.now() - t);
        if (res.status !== 201) throw new Error(`submission ${taskId} answered ${res.status}`);
        started.push(taskId);

        // admission alone (pre-flight + capability)
        t = performance.now();
        await admitTask(
          { db, keys },
          { owner: 'alice', spec: spec(`c${i}`), taskId: `bench-c-${run}-${i}`, mintedBy: 'bench' },
        );
        admission.push(performance.now() - t);
      }
    } finally {
      await server.close();
    }
    const b = stats(before);
    const a = stats(after);
    const c = stats(admission);
    const fmt = (n: number) => Number(n.toFixed(2));
    return {
      name: 'submission',
      title: 'Task submission latency before and after pre-flight',
      method:
        `${runs} submissions per mode, alternating, one run; a spec with ${INPUTS} inputs in an owner space of ` +
        `${STORED_FILES} files; real repository (SQLite metadata) and Temporal dev server, no workers. ` +
        'Before: VspClient.submit (validate + start workflow). After: POST /v1/owners/<o>/tasks over HTTP ' +
        '(authenticate, pre-flight, mint and record the capability, start workflow). Admission: pre-flight + ' +
        'capability alone, in process.',
      rows: [
        { mode: 'before (validate + start)', 'median ms': fmt(b.median), 'p95 ms': fmt(b.p95) },
        { mode: 'after (task API with pre-flight)', 'median ms': fmt(a.median), 'p95 ms': fmt(a.p95) },
        {
          mode: 'admission alone (pre-flight + capability)',
          'median ms': fmt(c.median),
          'p95 ms': fmt(c.p95),
        },
      ],
      summary: {
        'submission median before / after (ms)': `${fmt(b.median)} / ${fmt(a.median)}`,
        'submission p95 before / after (ms)': `${fmt(b.p95)} / ${fmt(a.p95)}`,
        'pre-flight + capability median (ms)': fmt(c.median),
      },
    };
  } finally {
    for (const id of started)
      await temporal.workflow
        .getHandle(id)
        .terminate('benchmark cleanup')
        .catch(() => undefined);
    await db.close();
    await connection.close();
    await fs.rm(dataDir, { recursive: true, force: true });
  }
}
