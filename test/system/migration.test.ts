import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { HOST_BRIDGE, type TestNetwork } from '../../deploy/devcluster/netns';
import { qmpCommand } from '../../drivers/qemu/qmp';
import { QemuDriver, VmMigratedError } from '../../drivers/qemu/qemuDriver';
import type { MigrationProgress, MigrationResult, VmConfig, VmHandle } from '../../drivers/types';
import type { ClusterStorage } from '../../storage/diskLocator';
import { DiskImageStaging, readDataDiskFile } from '../../storage/diskImageStaging';
import { checkNfsExport } from '../../storage/nfsExport';
import type { VmStore } from '../../storage/vmStore';
import { startNfsTestHosts, type NfsTestHosts } from '../../deploy/devcluster/nfsTestHosts';
import { untilConsoleLine } from '../support/guestConsole';

/**
 * Live migration between three test hosts (network namespaces, each with its own nfs-ganesha export of
 * its VM store), real QEMU under TCG. Needs root. VMs are created on host a; only RAM moves.
 */
const HOSTS = ['a', 'b', 'c'] as const;
type Host = (typeof HOSTS)[number];
const MEMORY_MIB = 128;
const BLOB_BYTES = 4 * 1024 * 1024;
const SUBNET = '10.77.9';

/**
 * Releases guests (no timing assumption): a guest asks `GET /release/<vmId>` on the segment's gateway
 * once a second and reads its input only when the answer is 200, after the test's last migration.
 */
class ReleaseServer {
  private readonly released = new Set<string>();
  private readonly server = http.createServer((req, res) => {
    const vmId = /^\/release\/([\w-]+)$/.exec(req.url ?? '')?.[1];
    res.writeHead(vmId && this.released.has(vmId) ? 200 : 404).end();
  });

  /** Listens on `address`; returns `<address> <port>` (nc's arguments). */
  async listen(address: string): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, address, resolve));
    return `${address} ${(this.server.address() as AddressInfo).port}`;
  }

  release(vmId: string): void {
    this.released.add(vmId);
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

describe('live migration over per-host NFS (real QEMU, namespace hosts)', () => {
  let hosts: NfsTestHosts<Host> | undefined;
  let network: TestNetwork;
  let stores: Record<Host, VmStore>;
  let drivers: Record<Host, QemuDriver>;
  let cluster: ClusterStorage;
  let baseImage: string;
  let started: { host: Host; handle: VmHandle }[];
  let releaseAddress: string;
  const releases = new ReleaseServer();
  const staging = new DiskImageStaging();
  const noAbort = () => new AbortController().signal;

  beforeAll(async () => {
    hosts = await startNfsTestHosts({
      hosts: HOSTS,
      prefix: 'vspmig-',
      subnet: SUBNET,
      // The guests' NIC reaches the release server on the segment's gateway.
      vmNetwork: { bridge: HOST_BRIDGE, subnet: SUBNET },
    });
    ({ network, stores, drivers, cluster, baseImage, started } = hosts);
    releaseAddress = await releases.listen(network.gateway);
  });

  afterAll(async () => {
    await hosts?.stop();
    await releases.close();
  });

  /** A VM on host a whose task waits for its release, then hashes its 4 MiB input into md5.txt. */
  async function startVmOnA(vmId: string): Promise<{ handle: VmHandle; blobMd5: string }> {
    const paths = stores.a.paths(vmId);
    const blob = randomBytes(BLOB_BYTES);
    await fs.mkdir(paths.inputsDir, { recursive: true });
    await fs.writeFile(path.join(paths.inputsDir, 'blob.bin'), blob);
    await staging.build(paths, 4 * 1024 * 1024);
    const config: VmConfig = {
      vmId,
      owner: 'alice',
      command:
        `echo "VSP-PROGRESS 1 waiting"; ` +
        // nc, not wget: the static busybox's wget crashes in the guest (its resolver wants glibc's NSS).
        `until printf 'GET /release/${vmId} HTTP/1.0\\r\\n\\r\\n' | nc -w 5 ${releaseAddress} | grep -q '^HTTP/1.[01] 200'; ` +
        `do sleep 1; done; ` +
        `md5sum blob.bin > md5.txt; echo "VSP-PROGRESS 100 released"`,
      vcpus: 1,
      memoryMiB: MEMORY_MIB,
      baseImage,
      // A port makes it a service VM, the kind that gets a NIC on the VM network (to ask for its release).
      ports: [8080],
      timeLimitSec: 600,
    };
    const handle = await drivers.a.start(await drivers.a.create(config));
    started.push({ host: 'a', handle });
    await untilConsoleLine(stores.a.paths(vmId).consoleLog, 'VSP-PROGRESS 1');
    return { handle, blobMd5: createHash('md5').update(blob).digest('hex') };
  }

  async function migrate(
    vm: VmHandle,
    to: Host,
    onProgress?: (p: MigrationProgress) => void,
    maxBandwidthBytesPerSec?: number,
  ): Promise<{ handle: VmHandle; result: MigrationResult }> {
    const from = drivers[vm.host as Host];
    const source = await from.describeForMigration(vm);
    const incoming = await drivers[to].prepareIncoming(source);
    try {
      const result = await from.migrate(vm, incoming, {
        downtimeLimitMs: 300,
        onProgress,
        maxBandwidthBytesPerSec,
      });
      const handle = await drivers[to].finishIncoming(incoming);
      started.push({ host: to, handle });
      return { handle, result };
    } catch (err) {
      await drivers[to].abortIncoming(incoming);
      throw err;
    }
  }

  /** What QEMU on the VM's current host opened as the VM's first disk. */
  async function rootDiskAsOpened(handle: VmHandle): Promise<string> {
    const blocks = await qmpCommand<{ inserted?: { file: string } }[]>(
      String(handle.state.qmpSocket),
      'query-block',
    );
    return blocks.find((b) => b.inserted)?.inserted?.file ?? '';
  }

  function expectMemoryOnly(result: MigrationResult) {
    expect(result.diskTransferredBytes).toBe(0);
    expect(result.ramTransferredBytes).toBeGreaterThan(0);
    // Far less than the disks would be (root overlay + 4 MiB input + base image).
    expect(result.ramTransferredBytes).toBeLessThan(2 * MEMORY_MIB * 1024 * 1024);
  }

  async function finishAndCheck(handle: VmHandle, vmId: string, blobMd5: string) {
    releases.release(vmId);
    const exit = await drivers[handle.host as Host].wait(handle, {
      onProgress: () => undefined,
      signal: noAbort(),
    });
    expect(exit).toMatchObject({ exitCode: 0, timedOut: false });
    // Released where it ended, so it read its input there (over NFS unless back home).
    const consoleLog = await fs.readFile(String(handle.state.consoleLog), 'utf8');
    expect(consoleLog).toMatch(/^VSP-PROGRESS 100 released/m);
    // The guest's last write went to the data disk in a's store, wherever the guest ran.
    const md5 = await readDataDiskFile(stores.a.paths(vmId).dataDisk, 'md5.txt');
    expect(md5?.split(' ')[0]).toBe(blobMd5);
  }

  test('exports answer from every host; an unreachable one is a clear error', async () => {
    for (const h of HOSTS) await checkNfsExport('a', cluster.a, network.hosts[h].netns);
    await expect(checkNfsExport('ghost', { address: '10.77.9.77', exportPath: '/vsp' })).rejects.toThrow(
      'the NFS export of host ghost (nfs://10.77.9.77/vsp/) is unreachable',
    );
  });

  test('a -> b -> a: memory only, b reads the disks over NFS, back home the disks are local again', async () => {
    const { handle, blobMd5 } = await startVmOnA('vm-home');
    expect(await rootDiskAsOpened(handle)).toBe(stores.a.paths('vm-home').rootDisk);

    await expect(drivers.a.prepareIncoming(await drivers.a.describeForMigration(handle))).rejects.toThrow(
      'already runs on a',
    );

    // The expectation is attached now: the wait may end (the VM left) before the migration call returns.
    const waitingOnA = expect(
      drivers.a.wait(handle, { onProgress: () => undefined, signal: noAbort() }),
    ).rejects.toThrow(new VmMigratedError('vm-home', 'a', 'b'));
    const seen: MigrationProgress[] = [];
    const toB = await migrate(handle, 'b', (p) => seen.push(p));
    await waitingOnA;
    expectMemoryOnly(toB.result);
    expect(seen.some((p) => p.transferredBytes > 0)).toBe(true);
    expect(toB.handle).toMatchObject({ host: 'b', storageHost: 'a' });
    expect(await rootDiskAsOpened(toB.handle)).toMatch(
      /"driver": "nfs".*"path": "\/vsp\/vms\/vm-home\/root.qcow2"/,
    );
    expect((await drivers.b.inspect(toB.handle)).details.qmpStatus).toBe('running');
    expect((await drivers.a.inspect(handle)).phase).not.toBe('running');

    const home = await migrate(toB.handle, 'a');
    expectMemoryOnly(home.result);
    expect(home.handle).toMatchObject({ host: 'a', storageHost: 'a' });
    expect(await rootDiskAsOpened(home.handle)).toBe(stores.a.paths('vm-home').rootDisk);
    await expect(fs.access(stores.b.paths('vm-home').dir)).rejects.toThrow();
    console.log(`migration figures a->b ${JSON.stringify(toB.result)} b->a ${JSON.stringify(home.result)}`);

    await finishAndCheck(home.handle, 'vm-home', blobMd5);
  });

  test('a failed migration (target killed) leaves the VM at the source; then a -> b -> c', async () => {
    const { handle, blobMd5 } = await startVmOnA('vm-roam');
    const source = await drivers.a.describeForMigration(handle);
    const incoming = await drivers.b.prepareIncoming(source);
    let killed = false;
    const failing = drivers.a.migrate(handle, incoming, {
      // Throttled so the kill lands mid-transfer.
      maxBandwidthBytesPerSec: 4 * 1024 * 1024,
      onProgress: (p) => {
        if (!killed && p.transferredBytes > 1024 * 1024) {
          killed = true;
          process.kill(Number(incoming.handle.state.pid), 'SIGKILL');
        }
      },
    });
    await expect(failing).rejects.toThrow(/migration a -> b failed; it runs on here/);
    expect(killed).toBe(true);
    expect((await drivers.a.inspect(handle)).details.qmpStatus).toBe('running');
    await drivers.b.abortIncoming(incoming);
    await expect(fs.access(stores.b.paths('vm-roam').dir)).rejects.toThrow();

    const toB = await migrate(handle, 'b');
    expectMemoryOnly(toB.result);
    const toC = await migrate(toB.handle, 'c');
    expectMemoryOnly(toC.result);
    expect(toC.handle).toMatchObject({ host: 'c', storageHost: 'a' });
    expect(await rootDiskAsOpened(toC.handle)).toMatch(/"driver": "nfs"/);
    await expect(fs.access(stores.b.paths('vm-roam').dir)).rejects.toThrow();
    console.log(`migration figures a->b ${JSON.stringify(toB.result)} b->c ${JSON.stringify(toC.result)}`);

    await finishAndCheck(toC.handle, 'vm-roam', blobMd5);
  });

  test('a VM restored from a snapshot migrates live like a booted one', async () => {
    const snapshotsOnA = new QemuDriver({ ...hosts!.driverOptions.a, snapshots: true });
    await snapshotsOnA.buildSnapshot({ memoryMiB: MEMORY_MIB, vcpus: 1, baseImage });
    const vmId = 'vm-restored';
    const paths = stores.a.paths(vmId);
    await fs.mkdir(paths.inputsDir, { recursive: true });
    await staging.build(paths, 1024 * 1024);
    // No ports (a snapshot has no NIC): the task waits until the test stops it.
    const config: VmConfig = {
      vmId,
      owner: 'alice',
      command: 'echo "VSP-PROGRESS 1 waiting"; exec sleep 3600',
      vcpus: 1,
      memoryMiB: MEMORY_MIB,
      baseImage,
      ports: [],
      timeLimitSec: 3600,
    };
    const handle = await snapshotsOnA.start(await snapshotsOnA.create(config));
    started.push({ host: 'a', handle });
    expect(handle.state.snapshot).toEqual(expect.any(String));
    await untilConsoleLine(paths.consoleLog, 'VSP-PROGRESS 1');

    const toB = await migrate(handle, 'b');
    expectMemoryOnly(toB.result);
    expect((await drivers.b.inspect(toB.handle)).details.qmpStatus).toBe('running');
    // The guest lives on at b: a graceful stop there ends its task, and the init records the exit there.
    await drivers.b.stop(toB.handle, 60_000);
    const consoleOnB = await fs.readFile(String(toB.handle.state.consoleLog), 'utf8');
    expect(consoleOnB).toMatch(/^VSP-STOPPING/m);
    expect(consoleOnB).toMatch(/^VSP-EXIT /m);
  });
});
