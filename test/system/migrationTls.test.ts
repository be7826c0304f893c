import { promises as fs } from 'node:fs';
import path from 'node:path';
import { issueMigrationCerts } from '../../deploy/devcluster/migrationCerts';
import { startNfsTestHosts, type NfsTestHosts } from '../../deploy/devcluster/nfsTestHosts';
import { qemuLogOf } from '../../drivers/qemu/commandLine';
import { qmpCommand } from '../../drivers/qemu/qmp';
import { QemuDriver } from '../../drivers/qemu/qemuDriver';
import { isVmProcess } from '../../drivers/qemu/vmProcess';
import type { IncomingVm, VmConfig, VmHandle } from '../../drivers/types';
import { describeError } from '../../logging/logger';
import { DiskImageStaging } from '../../storage/diskImageStaging';
import { untilConsoleLine } from '../support/guestConsole';

/**
 * Live migration over TLS between two namespace test hosts whose certificates come from their own CA
 * (deploy/migration-tls.sh), real QEMU under TCG, disks over NFS. Needs root. One VM: every refused
 * stream must leave it running at its source and the target still waiting for the chosen source.
 */
const HOSTS = ['a', 'b'] as const;
type Host = (typeof HOSTS)[number];

describe('live migration over TLS (real QEMU, namespace hosts)', () => {
  let hosts: NfsTestHosts<Host> | undefined;
  const staging = new DiskImageStaging();

  beforeAll(async () => {
    hosts = await startNfsTestHosts({ hosts: HOSTS, prefix: 'vsptls-', subnet: '10.77.13' });
  });

  afterAll(async () => {
    await hosts?.stop();
  });

  async function startVmOnA(vmId: string): Promise<VmHandle> {
    const t = hosts as NfsTestHosts<Host>;
    const paths = t.stores.a.paths(vmId);
    await fs.mkdir(paths.inputsDir, { recursive: true });
    await staging.build(paths, 4 * 1024 * 1024);
    const config: VmConfig = {
      vmId,
      owner: 'alice',
      // Runs until destroyed: the test ends it, never a clock.
      command: 'echo "VSP-PROGRESS 1 up"; while true; do sleep 1; done',
      vcpus: 1,
      memoryMiB: 128,
      baseImage: t.baseImage,
      ports: [],
      timeLimitSec: 600,
    };
    const handle = await t.drivers.a.start(await t.drivers.a.create(config));
    t.started.push({ host: 'a', handle });
    // Migrated once its task runs, not mid-boot: a TCG guest moved while booting can fail to load.
    await untilConsoleLine(paths.consoleLog, 'VSP-PROGRESS 1 up');
    return handle;
  }

  /** The VM still runs at a (the guest, not a paused copy) and b's incoming QEMU still waits. */
  async function expectStillAtSource(handle: VmHandle, incoming: IncomingVm): Promise<void> {
    const t = hosts as NfsTestHosts<Host>;
    expect((await t.drivers.a.inspect(handle)).details.qmpStatus).toBe('running');
    const incomingQmp = String(incoming.handle.state.qmpSocket);
    expect(await isVmProcess(Number(incoming.handle.state.pid), incomingQmp)).toBe(true);
    expect((await qmpCommand<{ status: string }>(incomingQmp, 'query-status')).status).toBe('inmigrate');
  }

  test('only the chosen source, with the cluster certificate, over TLS, can migrate the VM', async () => {
    const t = hosts as NfsTestHosts<Host>;
    const tlsDirs = t.tlsDirs as Record<Host, string>;
    // Outsiders: host a's name under another CA, and another name (c) under the cluster's own CA. Both
    // trust the cluster's CA too, so they accept b: only b's own checks can refuse them.
    const outsider = await issueMigrationCerts(path.join(t.workDir, 'outsider-tls'), { a: '10.77.13.2' });
    await fs.appendFile(
      path.join(outsider.a, 'ca-cert.pem'),
      await fs.readFile(path.join(tlsDirs.b, 'ca-cert.pem')),
    );
    const { c: otherHost } = await issueMigrationCerts(path.join(t.workDir, 'tls'), { c: '10.77.13.9' });
    const asA = (migrationTlsDir: string | undefined) =>
      new QemuDriver({ ...t.driverOptions.a, migrationTlsDir });

    const handle = await startVmOnA('vm-tls');
    const incoming = await t.drivers.b.prepareIncoming(await t.drivers.a.describeForMigration(handle));
    expect(incoming.tls).toEqual({ hostname: 'b' });
    expect(
      await qmpCommand<Record<string, unknown>>(
        String(incoming.handle.state.qmpSocket),
        'query-migrate-parameters',
      ),
    ).toMatchObject({ 'tls-creds': 'vsp-migration-tls', 'tls-authz': 'vsp-migration-authz' });

    // Refused before anything is sent: a TLS host never streams memory in the clear, nor a plain host to TLS.
    await expect(t.drivers.a.migrate(handle, { ...incoming, tls: undefined }, {})).rejects.toThrow(
      'b listens for plain TCP; this host sends VM memory over TLS only',
    );
    await expect(asA(undefined).migrate(handle, incoming, {})).rejects.toThrow(
      'b accepts migrations over TLS only, and this host has no migration certificates',
    );

    // Refused by the target: another CA's certificate, a cluster certificate of the wrong host, plain TCP.
    for (const [why, driver, target] of [
      ['another CA', asA(outsider.a), incoming],
      ['another cluster host', asA(otherHost), incoming],
      ['plain TCP', asA(undefined), { ...incoming, tls: undefined }],
    ] as const) {
      const refused = await driver.migrate(handle, target, { timeoutMs: 60_000 }).then(
        () => undefined,
        (err: unknown) => describeError(err),
      );
      expect(refused).toMatch(/migration a -> b failed; it runs on here/);
      await expectStillAtSource(handle, incoming);
      console.log(`migration from ${why}: refused (${refused}); the VM runs on at a`);
    }

    // b itself refused each one, and said why (the incoming QEMU's log).
    const refusals = await fs.readFile(qemuLogOf(t.stores.b.paths('vm-tls')), 'utf8');
    expect(refusals).toMatch(/known issuer[\s\S]*authz check for CN=c is denied[\s\S]*TLS handshake failed/);

    // The chosen source with its cluster certificate.
    const result = await t.drivers.a.migrate(handle, incoming, { downtimeLimitMs: 300 });
    const moved = await t.drivers.b.finishIncoming(incoming);
    t.started.push({ host: 'b', handle: moved });
    expect(result).toMatchObject({ from: 'a', to: 'b', diskTransferredBytes: 0 });
    expect(result.ramTransferredBytes).toBeGreaterThan(0);
    expect((await t.drivers.b.inspect(moved)).details.qmpStatus).toBe('running');
    console.log(`TLS migration a->b ${JSON.stringify(result)}`);

    // Production's way to the disks: b opens them under the mounts of the other stores (here a link
    // stands for a's kernel NFS mount), not through QEMU's own NFS client.
    const home = await migrateWith(t.drivers.a, moved);
    const mountRoot = path.join(t.workDir, 'cluster');
    await fs.mkdir(mountRoot, { mode: 0o755 });
    await fs.symlink(t.stores.a.root, path.join(mountRoot, 'a'));
    const viaMounts = new QemuDriver({ ...t.driverOptions.b, remoteDisksUnder: mountRoot });
    const again = await migrateWith(viaMounts, home);
    const blocks = await qmpCommand<{ inserted?: { file: string } }[]>(
      String(again.state.qmpSocket),
      'query-block',
    );
    expect(blocks.find((b) => b.inserted)?.inserted?.file).toContain(`${mountRoot}/a/vms/vm-tls/root.qcow2`);
    expect((await viaMounts.inspect(again)).details.qmpStatus).toBe('running');
  });

  /** Migrates the VM from where it runs to `target`'s host, over TLS; returns its handle there. */
  async function migrateWith(target: QemuDriver, vm: VmHandle): Promise<VmHandle> {
    const t = hosts as NfsTestHosts<Host>;
    const from = t.drivers[vm.host as Host];
    const incoming = await target.prepareIncoming(await from.describeForMigration(vm));
    await from.migrate(vm, incoming, { downtimeLimitMs: 300 });
    const handle = await target.finishIncoming(incoming);
    t.started.push({ host: handle.host as Host, handle });
    return handle;
  }
});
