import '../support/rootOnly';

import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';

import { setUpTemporalSchema, startTemporalPgServer, temporalSqlEnv } from '../../deploy/temporal/server';
import { qmpCommand } from '../../drivers/qemu/qmp';
import { until } from '../support/clusterFixture';
import { startNamespaceCluster, type NamespaceCluster } from '../support/namespaceCluster';
import { startPostgres, type TestDatabase } from '../support/postgres';
import { hashRoundsCommand } from '../support/releasedTasks';
import { testLogDir } from '../support/testRun';
import { findVmId } from '../support/vmFolders';

/**
 * A live migration through the TaskLifecycle workflow with Temporal on PostgreSQL (deploy/temporal/): the
 * process driver cannot live-migrate, so this is QEMU under TCG on two namespace test hosts with their
 * NFS exports, as test/system/migrationLifecycle.test.ts, with the real Temporal server instead of the
 * dev server. Needs root.
 */
const HOSTS = ['a', 'b'];
const OWNER = 'alice';
const DATA = randomBytes(1024 * 1024);
const DATA_SHA = createHash('sha256').update(DATA).digest('hex');

let persistence: TestDatabase | undefined;
let visibility: TestDatabase | undefined;
let ns: NamespaceCluster | undefined;

beforeAll(async () => {
  [persistence, visibility] = await Promise.all([startPostgres(), startPostgres()]);
  const sqlEnv = temporalSqlEnv(persistence.url, visibility.url);
  await setUpTemporalSchema(sqlEnv);
  const logFile = path.join(testLogDir(), `temporal-pg-migration-${process.pid}.log`);
  ns = await startNamespaceCluster({
    hosts: HOSTS,
    prefix: 'vsptpg-',
    subnet: '10.77.61',
    owners: [OWNER],
    startTemporal: (ip) => startTemporalPgServer({ sqlEnv, ip, namespace: 'vsp', logFile }),
  });
  const f = path.join(ns.baseDir, 'data.bin');
  await fs.writeFile(f, DATA);
  await ns.repo(OWNER).upload(OWNER, 'in/data.bin', f);
}, 300_000);

afterAll(async () => {
  await ns?.stop();
  await visibility?.stop();
  await persistence?.stop();
}, 120_000);

/** Waits until the guest on `host` printed round `n` or later (each host's console starts at arrival). */
async function awaitRound(c: NamespaceCluster, host: string, vmId: string, n: number): Promise<void> {
  await until(
    `round ${n} of ${vmId} on ${host}`,
    async () => {
      const text = await fs.readFile(path.join(c.vmDir(host, vmId), 'console.log'), 'utf8');
      return (
        [...text.matchAll(/^VSP-PROGRESS \d+ round (\d+)/gm)].some((m) => Number(m[1]) >= n) || undefined
      );
    },
    180_000,
  );
}

test('a QEMU task live-migrated a -> b on Temporal on PostgreSQL completes with every round right', async () => {
  const c = ns!;
  // Hashes its input round after round until released by the ACPI power button (no guessed duration).
  const { taskId } = await c.cluster.submitTask(OWNER, {
    driver: 'qemu',
    host: 'a',
    memoryMiB: 256,
    timeLimitSec: 600,
    inputs: ['in/data.bin'],
    command: hashRoundsCommand('in/data.bin', { hashes: 3 }),
  });
  const vmId = await findVmId(
    HOSTS.map((h) => c.cluster.storeDir(h)),
    taskId,
  );
  await awaitRound(c, 'a', vmId, 2);
  expect(await c.vsp.migrate(taskId, { host: 'b' })).toMatchObject({
    host: 'b',
    storageHost: 'a',
    phase: 'running',
  });
  await awaitRound(c, 'b', vmId, 1);
  await qmpCommand(path.join(c.vmDir('b', vmId), 'run', 'qmp.sock'), 'system_powerdown');
  const result = await c.vsp.result(taskId);

  expect(result).toMatchObject({ exitCode: 0, host: 'b', storageHost: 'a' });
  expect(result.migrations).toEqual([expect.objectContaining({ from: 'a', to: 'b', ok: true })]);
  const f = path.join(c.baseDir, 'rounds.txt');
  await c.repo(OWNER).download(OWNER, `${result.resultsPath}/outputs/rounds.txt`, f);
  const lines = (await fs.readFile(f, 'utf8')).trim().split('\n');
  // Rounds ran on a and on b: at least the two awaited on a and the one on b.
  expect(lines.length).toBeGreaterThanOrEqual(3);
  expect(lines).toEqual(lines.map(() => `${DATA_SHA}  in/data.bin`));
  for (const h of HOSTS) expect(await fs.readdir(path.join(c.cluster.storeDir(h), 'vms'))).toEqual([]);
}, 400_000);
