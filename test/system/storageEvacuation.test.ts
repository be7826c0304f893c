import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { qmpCommand } from '../../drivers/qemu/qmp';
import type { TaskSpecInput } from '../../spec/taskSpec';
import type { TaskStatus } from '../../workflows/definitions';
import { until } from '../support/clusterFixture';
import { startNamespaceCluster, type NamespaceCluster } from '../support/namespaceCluster';
import { findVmId } from '../support/vmFolders';
import { qemuHostsOf } from '../support/vmProcesses';

/**
 * Storage evacuation (issue 12, item 6): a running VM's disks move from their storage host to the host
 * where the VM runs (QEMU drive-mirror from nfs:// to a local file, then the switch), the new storage
 * host is recorded, and the former one drops its copy; with `localizeDisksAfterMigration` a migration
 * takes the disks along. (A drain's evacuation: test/system/scheduler.test.ts.) Namespace test hosts with nfs-ganesha exports, real Temporal, QEMU
 * under TCG. Needs root.
 */
const execFileAsync = promisify(execFile);
const HOSTS = ['a', 'b'];
const OWNER = 'alice';
const BLOB_MIB = 16;

let ns: NamespaceCluster;

beforeAll(async () => {
  ns = await startNamespaceCluster({ hosts: HOSTS, prefix: 'vspev-', subnet: '10.77.41', owners: [OWNER] });
}, 240_000);

afterAll(async () => {
  await ns?.stop();
}, 120_000);

const storeDirs = () => Object.fromEntries(HOSTS.map((h) => [h, ns.cluster.storeDir(h)]));
const vmsOn = (host: string) => fs.readdir(path.join(ns.cluster.storeDir(host), 'vms')).catch(() => []);
const vmIdOf = (taskId: string) =>
  findVmId(
    HOSTS.map((h) => ns.cluster.storeDir(h)),
    taskId,
  );
const qmpOf = (host: string, vmId: string) => path.join(ns.vmDir(host, vmId), 'run', 'qmp.sock');

/** What QEMU on `host` has open for each drive. */
async function drivesOn(host: string, vmId: string): Promise<string[]> {
  const blocks = await qmpCommand<{ inserted?: { file: string } }[]>(qmpOf(host, vmId), 'query-block');
  return blocks.flatMap((b) => (b.inserted ? [b.inserted.file] : []));
}

async function downloaded(resultsPath: string, file: string): Promise<Buffer> {
  const local = path.join(ns.baseDir, `${path.basename(resultsPath)}-${file}`);
  await ns.repo(OWNER).download(OWNER, `${resultsPath}/outputs/${file}`, local);
  return fs.readFile(local);
}

test('a VM on b with its disks on a ends with them on b, its data intact, a holding nothing', async () => {
  const { cluster, vsp } = ns;
  // Writes a random file before the move; at the power button reads it back from the disk (O_DIRECT,
  // not the page cache) after it; the file itself is an output, extracted from the disk on b.
  const spec: TaskSpecInput = {
    owner: OWNER,
    driver: 'qemu',
    host: 'a',
    memoryMiB: 192,
    timeLimitSec: 900,
    command: [
      'mkdir -p out',
      `head -c ${BLOB_MIB * 1024 * 1024} /dev/urandom > out/blob`,
      'sync',
      'sha256sum < out/blob > out/before.sha',
      'sync',
      'stop=',
      "trap 'stop=1' TERM",
      'echo "VSP-PROGRESS 10 written"',
      'while [ -z "$stop" ]; do sleep 1; done',
      'dd if=out/blob iflag=direct bs=1M 2>/dev/null | sha256sum > out/after.sha',
      'exit 0',
    ].join('\n'),
  };
  const { taskId } = await cluster.submitTask(OWNER, spec);
  const vmId = await vmIdOf(taskId);
  await until(
    'the file written on a',
    async () =>
      (await fs.readFile(path.join(ns.vmDir('a', vmId), 'console.log'), 'utf8').catch(() => '')).includes(
        'VSP-PROGRESS 10 written',
      ) || undefined,
    300_000,
  );
  const migrated = await vsp.migrate(taskId, { host: 'b' });
  expect(migrated).toMatchObject({ host: 'b', storageHost: 'a' });
  expect((await drivesOn('b', vmId)).every((f) => f.startsWith('nfs://') || f.startsWith('json:'))).toBe(
    true,
  );

  // Through the operators' CLI (`vsp localize-disks`, VspClient.localizeDisks underneath).
  const cli = await execFileAsync(
    'node',
    [path.resolve(__dirname, '../../dist/cli/vsp.js'), '--json', 'localize-disks', taskId],
    { env: { ...process.env, TEMPORAL_ADDRESS: ns.temporalAddress } },
  );
  const moved = JSON.parse(cli.stdout) as TaskStatus;
  expect(moved).toMatchObject({ phase: 'running', host: 'b', storageHost: 'b' });
  const record = moved.storageMoves?.at(-1);
  expect(record).toMatchObject({ from: 'a', to: 'b', ok: true });
  expect(record?.bytes).toBeGreaterThanOrEqual(BLOB_MIB * 1024 * 1024);
  expect(record?.dropError).toBeUndefined();
  process.stderr.write(
    `storage evacuation: ${record?.bytes} virtual bytes mirrored, ${record?.mirrorMs} ms\n`,
  );
  // QEMU on b runs on its local copies; a's store holds nothing of the VM.
  const local = path.join(cluster.storeDir('b'), 'vms', vmId);
  expect((await drivesOn('b', vmId)).sort()).toEqual(
    [path.join(local, 'data.img'), path.join(local, 'root.qcow2')].sort(),
  );
  expect(await vmsOn('a')).toEqual([]);
  expect(await qemuHostsOf(vmId, storeDirs())).toEqual(['b']);
  // A second request is refused: nothing left to move.
  const refused = await vsp.localizeDisks(taskId).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect((refused as Error | undefined)?.cause).toMatchObject({
    message: expect.stringMatching(/already on b/),
  });

  await qmpCommand(qmpOf('b', vmId), 'system_powerdown');
  const result = await vsp.result(taskId);
  expect(result).toMatchObject({ exitCode: 0, host: 'b', storageHost: 'b' });
  const [blob, before, after] = await Promise.all(
    ['blob', 'before.sha', 'after.sha'].map((f) => downloaded(result.resultsPath, f)),
  );
  const sha = createHash('sha256').update(blob).digest('hex');
  expect(blob.length).toBe(BLOB_MIB * 1024 * 1024);
  expect(before.toString().split(/\s/)[0]).toBe(sha);
  expect(after.toString().split(/\s/)[0]).toBe(sha);
  for (const h of HOSTS) expect(await vmsOn(h)).toEqual([]);
}, 900_000);

test('with localizeDisksAfterMigration in its spec, a migrated VM takes its disks along', async () => {
  const { cluster, vsp } = ns;
  const { taskId } = await cluster.submitTask(OWNER, {
    owner: OWNER,
    driver: 'qemu',
    host: 'a',
    memoryMiB: 128,
    localizeDisksAfterMigration: true,
    command: 'mkdir -p out; echo kept > out/k.txt; while [ ! -e release ]; do sleep 1; done',
  });
  await until(
    'the task running on a',
    async () => ((await vsp.status(taskId)).phase === 'running' ? true : undefined),
    300_000,
  );
  const vmId = await vmIdOf(taskId);
  const moved = await vsp.migrate(taskId, { host: 'b' });
  expect(moved).toMatchObject({ host: 'b', storageHost: 'b' });
  expect(moved.storageMoves).toEqual([expect.objectContaining({ from: 'a', to: 'b', ok: true })]);
  expect(await vmsOn('a')).toEqual([]);
  await vsp.cancel(taskId, 'test done');
  await vsp.result(taskId).catch(() => undefined);
  expect(await qemuHostsOf(vmId, storeDirs())).toEqual([]);
  for (const h of HOSTS) expect(await vmsOn(h)).toEqual([]);
}, 600_000);
