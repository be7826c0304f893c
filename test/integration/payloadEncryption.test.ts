import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { temporal } from '@temporalio/proto';
import { ENCRYPTED_ENCODING, PAYLOAD_KEY_ENV } from '../../config/payloadCodec';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';

/**
 * With a payload key configured (VSP_PAYLOAD_KEY_FILE, every process of the cluster), a task runs as
 * always, while Temporal's history holds its spec and capability only encrypted.
 */
let fx: ClusterFixture;
let keyDir: string;

beforeAll(async () => {
  keyDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-payload-key-'));
  const keyFile = path.join(keyDir, 'payload.key');
  await fs.writeFile(keyFile, `${randomBytes(32).toString('base64url')}\n`, { mode: 0o600 });
  // The cluster's processes read it from their environment (the cluster passes ours on).
  process.env[PAYLOAD_KEY_ENV] = keyFile;
  try {
    fx = await startClusterFixture({ hosts: ['a'], owners: ['alice'] });
  } finally {
    delete process.env[PAYLOAD_KEY_ENV];
  }
  await fx.repo('alice').upload('alice', 'in/x.txt', Readable.from([Buffer.from('plain input\n')]));
}, 180_000);

afterAll(async () => {
  await fx?.stop();
  if (keyDir) await fs.rm(keyDir, { recursive: true, force: true });
});

test("a task runs with encrypted payloads; Temporal's history holds no spec or capability in clear", async () => {
  const command = 'mkdir -p out && cat in/x.txt > out/copy-of-the-input.txt';
  const tasks = fx.cluster.tasks('alice');
  const { taskId } = await tasks.submit({ command, inputs: ['in/x.txt'], driver: 'process' });
  const result = await until(
    `task ${taskId} done`,
    () => tasks.result(taskId).catch(() => undefined),
    120_000,
  );
  expect(result.outputs.map((o) => o.path)).toEqual([`results/${taskId}/outputs/copy-of-the-input.txt`]);

  // The test's own client has no key: it sees what Temporal stores.
  const history = await fx.temporal.workflow.getHandle(taskId).fetchHistory();
  const started = history.events![0].workflowExecutionStartedEventAttributes!.input!.payloads![0];
  expect(Buffer.from(started.metadata!.encoding!).toString()).toBe(ENCRYPTED_ENCODING);
  const stored = Buffer.from(temporal.api.history.v1.History.encode(history).finish());
  for (const clear of ['vspcap_', 'copy-of-the-input', 'in/x.txt'])
    expect([clear, stored.includes(Buffer.from(clear))]).toEqual([clear, false]);
});
