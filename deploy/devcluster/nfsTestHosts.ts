import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createTestNetwork, type TestNetwork } from './netns';
import type { Accelerator } from '../../drivers/qemu/accelerator';
import { ensureAppliance } from '../../drivers/qemu/appliance';
import { QemuDriver, type QemuDriverOptions } from '../../drivers/qemu/qemuDriver';
import type { VmNetworkOptions } from '../../drivers/qemu/vmNetwork';
import type { VmHandle } from '../../drivers/types';
import type { ClusterStorage } from '../../storage/diskLocator';
import { createLogger, describeError } from '../../logging/logger';
import { ImageCache } from '../../storage/imageCache';
import { startNfsExport, type RunningNfsExport } from '../../storage/nfsExport';
import { VmStore } from '../../storage/vmStore';
import { issueMigrationCerts } from './migrationCerts';

export interface NfsTestHosts<H extends string> {
  network: TestNetwork;
  stores: Record<H, VmStore>;
  drivers: Record<H, QemuDriver>;
  /** What each host's driver was made with (a variant, e.g. without TLS, shares the store). */
  driverOptions: Record<H, QemuDriverOptions>;
  /** Each host's migration credentials (undefined when the hosts migrate over plain TCP). */
  tlsDirs?: Record<H, string>;
  /** Where the hosts' state lives (removed by stop): room for a test's own certificates. */
  workDir: string;
  cluster: ClusterStorage;
  /** The appliance root, cached in the first host's store (VMs are created there). */
  baseImage: string;
  /** VMs the test started, destroyed by stop(). */
  started: { host: H; handle: VmHandle }[];
  stop(): Promise<void>;
}

const log = createLogger('devcluster.nfs-hosts');

/**
 * Namespace test hosts, each exporting its own VM store over NFS (nfs-ganesha) and with a QEMU driver
 * that knows every export: what the migration tests and the paper benchmark run on. Needs root. A failed
 * setup tears down what it made.
 */
export async function startNfsTestHosts<H extends string>(opts: {
  hosts: readonly H[];
  prefix: string;
  subnet: string;
  vmNetwork?: VmNetworkOptions;
  /** Default: the bounded probe. */
  accel?: Accelerator;
  /** Where the hosts' stores go (in a new folder removed by stop); default the system temp folder. */
  parentDir?: string;
  /** Migrations over TLS with certificates of a CA made for these hosts (default true). */
  migrationTls?: boolean;
}): Promise<NfsTestHosts<H>> {
  const appliance = await ensureAppliance();
  const work = await fs.mkdtemp(path.join(opts.parentDir ?? os.tmpdir(), `${opts.prefix}work-`));
  // QEMU's unprivileged account must reach the stores and certificates (mkdtemp makes the folder private).
  await fs.chmod(work, 0o711);
  const exports: RunningNfsExport[] = [];
  let network: TestNetwork | undefined;
  const t = {
    stores: {} as Record<H, VmStore>,
    drivers: {} as Record<H, QemuDriver>,
    driverOptions: {} as Record<H, QemuDriverOptions>,
    tlsDirs: undefined as Record<H, string> | undefined,
    workDir: work,
    cluster: {} as ClusterStorage,
    started: [] as { host: H; handle: VmHandle }[],
    async stop() {
      for (const { host, handle } of t.started.splice(0).reverse())
        await t.drivers[host]
          .destroy(handle)
          .catch((err: unknown) =>
            log.warn({ vmId: handle.vmId, err: describeError(err) }, 'destroy failed'),
          );
      for (const e of exports.splice(0)) await e.stop();
      await network?.teardown();
      await fs.rm(work, { recursive: true, force: true });
    },
  };
  try {
    network = await createTestNetwork({ hosts: [...opts.hosts], prefix: opts.prefix, subnet: opts.subnet });
    const net = network;
    for (const h of opts.hosts) {
      t.stores[h] = new VmStore(path.join(work, h, 'store'));
      await t.stores[h].init();
      t.cluster[h] = { address: net.hosts[h].address, exportPath: '/vsp' };
    }
    if (opts.migrationTls ?? true)
      t.tlsDirs = await issueMigrationCerts(
        path.join(work, 'tls'),
        Object.fromEntries(opts.hosts.map((h) => [h, net.hosts[h].address])) as Record<H, string>,
      );
    for (const h of opts.hosts) {
      exports.push(
        await startNfsExport({
          hostName: h,
          storeRoot: t.stores[h].root,
          endpoint: t.cluster[h],
          stateDir: path.join(work, h, 'nfs'),
          netns: net.hosts[h].netns,
        }),
      );
      t.driverOptions[h] = {
        store: t.stores[h],
        hostName: h,
        appliance,
        accel: opts.accel ?? 'auto',
        pollMs: 250,
        cluster: t.cluster,
        netns: net.hosts[h].netns,
        vmNetwork: opts.vmNetwork,
        migrationTlsDir: t.tlsDirs?.[h],
      };
      t.drivers[h] = new QemuDriver(t.driverOptions[h]);
    }
    const cache = new ImageCache({ dir: t.stores[opts.hosts[0]].imagesDir, maxVirtualBytes: 1024 ** 3 });
    const baseImage = (await cache.ensureFromFile(appliance.root.path, appliance.root.sha256)).path;
    return { ...t, network: net, baseImage };
  } catch (err) {
    await t.stop();
    throw err;
  }
}
