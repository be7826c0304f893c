import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createLogger, describeError } from '../../logging/logger';
import { inNetns } from '../../deploy/devcluster/netns';
import {
  locatorOf,
  qemuFileName,
  qemuFileNode,
  resolveForQemu,
  resolveUnderMounts,
  type DiskLocator,
  type QemuDiskSource,
  type ClusterStorage,
} from '../../storage/diskLocator';
import { checkNfsExport } from '../../storage/nfsExport';
import type { VmPaths, VmStore } from '../../storage/vmStore';
import type {
  IncomingVm,
  MigrationOptions,
  MigrationResult,
  MigrationSource,
  VmConfig,
  VmHandle,
} from '../types';
import type { Appliance } from './appliance';
import { buildQemuArgs, pidFileOf, qemuLogOf, recordedMachine, vmLaunch } from './commandLine';
import { ConsoleFollower, departedConsoleOf, setConsoleAside } from './consoleLog';
import { QMP_TIMEOUT_MS, QmpClient, qmpCommand } from './qmp';
import { type QemuVmState } from './qemuDriver';
import { MigrationRecords } from '../migrationRecords';
import { diskRefsOf, startedMarkerOf } from '../savedVm';
import {
  checkMigrationTlsDir,
  incomingTlsArgs,
  incomingTlsParameters,
  outgoingTlsParameters,
} from './migrationTls';
import { asAccount, checkReachable, giveToAccount, type QemuAccount } from './qemuAccount';
import { addVmTap, nicFromState, removeVmTap, type VmNetworkOptions } from './vmNetwork';
import { readPidFile } from '../processLiveness';
import { freeLocalPort, isVmProcess, sleep, startDetached, waitForExit } from './vmProcess';

/**
 * Memory-only live migration of QEMU VMs between hosts that reach each other's stores over NFS. The
 * target starts the same VM with `-incoming`, its disks opened by locator (a local file on the storage
 * host, nfs:// elsewhere); the source sends its RAM and device state with QMP `migrate`. Each host keeps
 * what it knows in its own store: `incoming.json` while a VM is being received, `state.json` once it runs.
 * With the hosts' migration certificates (migrationTls.ts) the memory goes over TLS, and the target
 * accepts it from the chosen source only.
 */

export interface QemuMigrationContext {
  store: VmStore;
  hostName: string;
  appliance: Appliance;
  qemuBinary: string;
  /** Every host's NFS export; its address is also where the host receives migrations. */
  cluster: ClusterStorage;
  /** Network namespace QEMU runs in (test hosts). */
  netns?: string;
  /** The cluster's VM network: a VM with a NIC gets its tap on this bridge here too. */
  vmNetwork?: VmNetworkOptions;
  /** The unprivileged account QEMU runs as (qemuAccount.ts). */
  account: () => Promise<QemuAccount | undefined>;
  /**
   * Where the other hosts' stores are mounted (kernel NFS, deploy/production/storagePlan.ts): QEMU then
   * opens remote disks there instead of over nfs:// (libnfs, which an unprivileged QEMU can only use with
   * exports that accept unreserved ports).
   */
  remoteDisksUnder?: string;
  /** This host's migration credentials; undefined: plain TCP streams. */
  migrationTlsDir?: string;
}

/** Defaults for options the caller leaves out. */
export const MIGRATION_DEFAULTS = {
  downtimeLimitMs: 300,
  timeoutMs: 10 * 60_000,
  /** Set on every migration, since QEMU keeps the last value (a throttled attempt would slow the next). */
  maxBandwidthBytesPerSec: 1024 ** 3,
};
const BASE_NODE = 'vsp-base';
const INCOMING_PORTS = { first: 47000, count: 2000 };
const PORT_ATTEMPTS = 5;
const POLL_MS = 200;
const LAUNCH_TIMEOUT_MS = 60_000;
/** How long the target may take to resume the guest after the source reported completion. */
const RESUME_TIMEOUT_MS = 30_000;
const QUIT_TIMEOUT_MS = 5_000;
const FINAL_STATES = new Set(['completed', 'failed', 'cancelled']);
const IN_PROGRESS = new Set([
  'setup',
  'active',
  'pre-switchover',
  'device',
  'wait-unplug',
  'postcopy-active',
]);

interface QueryMigrate {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  'error-desc'?: string;
  ram?: { transferred: number; remaining: number; total: number };
  disk?: { transferred: number };
}

export class QemuMigration extends MigrationRecords {
  private readonly log = createLogger('qemu-migration');

  constructor(private readonly ctx: QemuMigrationContext) {
    super(ctx);
  }

  /** On the source: the VM's config, handle and disk locators, from its state file here. */
  async describeForMigration(handle: VmHandle): Promise<MigrationSource> {
    const saved = await this.readState(handle.vmId);
    const { config, handle: current } = saved;
    if (current.host !== this.ctx.hostName)
      throw new Error(`VM ${handle.vmId} does not run on ${this.ctx.hostName} (it runs on ${current.host})`);
    return { config, handle: current, disks: this.disksOf(current) };
  }

  /** Disk locators: computed on the storage host, carried in the handle everywhere else. */
  private disksOf(handle: VmHandle): MigrationSource['disks'] {
    const stored = diskRefsOf(handle);
    if (stored) return stored;
    if (handle.storageHost !== this.ctx.hostName)
      throw new Error(
        `VM ${handle.vmId}: its handle names no disk locators and its disks are not on this host`,
      );
    const paths = this.ctx.store.paths(handle.vmId);
    const root = this.ctx.store.root;
    const baseImage = handle.state.baseImage;
    return {
      root: locatorOf(handle.storageHost, root, paths.rootDisk),
      data: locatorOf(handle.storageHost, root, paths.dataDisk),
      // A base image outside the store cannot be reached remotely: the target then needs it at the same path.
      base:
        typeof baseImage === 'string' && !path.relative(root, baseImage).startsWith('..')
          ? locatorOf(handle.storageHost, root, baseImage)
          : undefined,
    };
  }

  /** On the target: starts the VM waiting for its memory (`-incoming`), its disks opened in place. */
  async prepareIncoming(source: MigrationSource): Promise<IncomingVm> {
    const { config, handle: from, disks } = source;
    const vmId = config.vmId;
    if (from.driver !== 'qemu') throw new Error(`VM ${vmId} runs under driver '${from.driver}', not qemu`);
    if (from.vmId !== vmId) throw new Error(`migration source names VM ${from.vmId} and config ${vmId}`);
    if (from.host === this.ctx.hostName)
      throw new Error(`VM ${vmId} already runs on ${this.ctx.hostName}: pick another target host`);
    const self = this.ctx.cluster[this.ctx.hostName];
    if (!self) throw new Error(`host ${this.ctx.hostName} has no address in the cluster configuration`);
    const paths = this.ctx.store.paths(vmId);
    const existing = await this.readIncoming(vmId);
    if (existing) {
      if (
        existing.incoming.uri &&
        (await isVmProcess(await readPidFile(pidFileOf(paths)), paths.qmpSocket))
      ) {
        this.log.info({ vmId }, 'incoming VM already prepared');
        return existing.incoming;
      }
      // A QEMU that never got to listen (a worker died in between): start over.
      await this.abortIncoming(existing.incoming);
    }
    const tlsDir = this.ctx.migrationTlsDir;
    if (tlsDir) await checkMigrationTlsDir(tlsDir);
    const remote = from.storageHost !== this.ctx.hostName;
    const mountRoot = this.ctx.remoteDisksUnder;
    if (remote && mountRoot) {
      const where = path.posix.join(mountRoot, from.storageHost);
      // Touching it mounts it (automount); a storage host that does not answer fails here, clearly.
      await fs.stat(resolveUnderMounts(disks.root, mountRoot)).catch((err: unknown) => {
        throw new Error(`the disks of VM ${vmId} are not reachable under ${where}`, { cause: err });
      });
    } else if (remote) {
      const endpoint = this.ctx.cluster[from.storageHost];
      if (!endpoint) throw new Error(`no NFS export configured for storage host ${from.storageHost}`);
      await checkNfsExport(from.storageHost, endpoint, this.ctx.netns);
    }
    const local = { host: this.ctx.hostName, storeRoot: this.ctx.store.root, cluster: this.ctx.cluster };
    const open = (loc: DiskLocator): QemuDiskSource =>
      remote && mountRoot
        ? { kind: 'file', filename: resolveUnderMounts(loc, mountRoot) }
        : resolveForQemu(loc, local);
    const root = open(disks.root);
    const data = open(disks.data);
    // The overlay names its base by the storage host's own path: elsewhere it is opened where it is reached.
    const base = disks.base && remote ? open(disks.base) : undefined;

    await fs.mkdir(paths.dir, { recursive: true });
    // The same NIC (tap, MAC, address) as on the source: the guest keeps its address.
    const nic = nicFromState(from.state);
    if (nic && !this.ctx.vmNetwork)
      throw new Error(
        `VM ${vmId} is on the VM network, which host ${this.ctx.hostName} is not configured for`,
      );
    const portForwards: Record<number, number> = {};
    if (!nic) for (const port of config.ports) portForwards[port] = await freeLocalPort();
    const args = buildQemuArgs(
      vmLaunch(config, this.ctx.appliance, paths, {
        ...recordedMachine(from.state),
        portForwards,
        nic,
        disks: { root: qemuFileName(root), data: qemuFileName(data) },
      }),
    );
    if (base && disks.base) {
      const format = disks.base.path.endsWith('.raw') ? 'raw' : 'qcow2';
      overrideBacking(args, qemuFileName(root), { driver: format, file: qemuFileNode(base) });
    }

    const incoming: IncomingVm = {
      vmId,
      host: this.ctx.hostName,
      // Set once the incoming QEMU listens: an empty one tells a retry that it never did.
      uri: '',
      ...(tlsDir ? { tls: { hostname: this.ctx.hostName } } : {}),
      handle: {
        ...from,
        host: this.ctx.hostName,
        state: {
          ...withoutHostPorts(from.state),
          ...Object.fromEntries(Object.entries(portForwards).map(([g, h]) => [`hostPort:${g}`, h])),
          pidFile: pidFileOf(paths),
          qmpSocket: paths.qmpSocket,
          consoleLog: paths.consoleLog,
          diskRoot: disks.root.path,
          diskData: disks.data.path,
          diskBase: disks.base?.path ?? '',
          migratedFrom: from.host,
        },
      },
    };
    // Recorded before QEMU starts, so an abort after a crash here still finds what to clean.
    await this.writeIncoming(vmId, { source, incoming });
    await fs.rm(paths.qmpSocket, { force: true });
    await fs.rm(pidFileOf(paths), { force: true });
    try {
      const account = await this.ctx.account();
      await checkReachable(account, paths.dir);
      await giveToAccount(account, {
        // Disks elsewhere are the storage host's to give; QEMU reaches them there as the same account.
        disks: remote ? [] : [root, data].flatMap((d) => (d.kind === 'file' ? [d.filename] : [])),
        consoleLog: paths.consoleLog,
        runDir: paths.runDir,
      });
      if (nic && this.ctx.vmNetwork) await addVmTap(this.wrap, this.ctx.vmNetwork.bridge, nic.tap, account);
      const tlsArgs = tlsDir ? incomingTlsArgs(tlsDir, from.host) : [];
      const qemu = asAccount(account, this.ctx.qemuBinary, [...args, ...tlsArgs, '-incoming', 'defer']);
      incoming.handle.state.pid = await startDetached(this.wrap(qemu.cmd, qemu.args), {
        qmpSocket: paths.qmpSocket,
        logFile: qemuLogOf(paths),
        pidFile: pidFileOf(paths),
        timeoutMs: LAUNCH_TIMEOUT_MS,
      });
      await this.writeIncoming(vmId, { source, incoming });
      incoming.uri = await this.listen(paths.qmpSocket, self.address, Boolean(tlsDir));
    } catch (err) {
      await this.abortIncoming(incoming);
      throw new Error(`VM ${vmId}: cannot start the incoming QEMU on ${this.ctx.hostName}`, { cause: err });
    }
    await this.writeIncoming(vmId, { source, incoming });
    this.log.info(
      {
        vmId,
        uri: incoming.uri,
        tls: Boolean(tlsDir),
        pid: incoming.handle.state.pid,
        root: qemuFileName(root),
      },
      'incoming VM ready',
    );
    return incoming;
  }

  /**
   * Makes the waiting QEMU listen for the memory on a free port of `address`, over TLS from the chosen
   * source only when `tls`; returns the URI the source sends to.
   */
  private async listen(qmpSocket: string, address: string, tls: boolean): Promise<string> {
    const qmp = await QmpClient.connect(qmpSocket, QMP_TIMEOUT_MS);
    try {
      if (tls) await qmp.execute('migrate-set-parameters', incomingTlsParameters(), QMP_TIMEOUT_MS);
      let lastError: unknown;
      for (let attempt = 0; attempt < PORT_ATTEMPTS; attempt++) {
        const uri = `tcp:${address}:${INCOMING_PORTS.first + Math.floor(Math.random() * INCOMING_PORTS.count)}`;
        try {
          await qmp.execute('migrate-incoming', { uri }, QMP_TIMEOUT_MS);
          return uri;
        } catch (err) {
          lastError = err;
          if (!/Address already in use/i.test(describeError(err))) throw err;
        }
      }
      throw new Error(`no free migration port on ${address}`, { cause: lastError });
    } finally {
      qmp.close();
    }
  }

  /**
   * On the source: sends the VM to the prepared target and, once QEMU reports completion, ends the
   * source QEMU. On failure, timeout or abort the VM keeps running here and this throws. Safe to retry
   * after a worker restart: it follows the migration QEMU still runs, or finishes the cleanup of one
   * that completed, and never starts a second one.
   */
  async migrate(handle: VmHandle, target: IncomingVm, options: MigrationOptions): Promise<MigrationResult> {
    const vmId = handle.vmId;
    const { config, handle: current } = await this.readState(vmId);
    const paths = this.ctx.store.paths(vmId);
    const saved = current.state.migrationResult;
    const left = typeof saved === 'string' ? (JSON.parse(saved) as MigrationResult) : undefined;
    if (current.host === target.host && current.state.migratingTo === target.uri && left) {
      this.log.info({ vmId, to: target.host }, 'migration had completed: finishing the cleanup here');
      await this.leave(config, current, paths);
      return left;
    }
    if (current.host !== this.ctx.hostName)
      throw new Error(`VM ${vmId} does not run on ${this.ctx.hostName} (its state says ${current.host})`);
    if (target.host === this.ctx.hostName) throw new Error(`VM ${vmId}: cannot migrate a VM to its own host`);
    const pid = Number(current.state.pid);
    if (!(await isVmProcess(pid, paths.qmpSocket)))
      throw new Error(`VM ${vmId} is not running on ${this.ctx.hostName}: nothing to migrate`);
    const tlsDir = this.ctx.migrationTlsDir;
    if (target.tls && !tlsDir)
      throw new Error(
        `VM ${vmId}: ${target.host} accepts migrations over TLS only, and this host has no migration certificates (VSP_MIGRATION_TLS_DIR)`,
      );
    if (!target.tls && tlsDir)
      throw new Error(
        `VM ${vmId}: ${target.host} listens for plain TCP; this host sends VM memory over TLS only`,
      );
    const timeoutMs = options.timeoutMs ?? MIGRATION_DEFAULTS.timeoutMs;
    const started = Date.now();
    const qmp = await QmpClient.connect(paths.qmpSocket, QMP_TIMEOUT_MS);
    let info: QueryMigrate;
    let marked = current;
    try {
      const resumed = await this.ourMigration(qmp, current, target);
      if (resumed) {
        this.log.info({ vmId, to: target.host, status: resumed }, 'following the migration under way');
      } else {
        marked = { ...current, state: { ...current.state, migratingTo: target.uri } };
        await this.ctx.store.writeState(vmId, { config, handle: marked } satisfies QemuVmState);
        const params = {
          'downtime-limit': options.downtimeLimitMs ?? MIGRATION_DEFAULTS.downtimeLimitMs,
          'max-bandwidth': options.maxBandwidthBytesPerSec ?? MIGRATION_DEFAULTS.maxBandwidthBytesPerSec,
        };
        const tls = await outgoingTlsParameters(qmp, tlsDir, target.tls, QMP_TIMEOUT_MS);
        await qmp.execute('migrate-set-parameters', { ...params, ...tls }, QMP_TIMEOUT_MS);
        this.log.info(
          { vmId, to: target.host, uri: target.uri, params, tls: Boolean(tls['tls-creds']) },
          'migration started',
        );
        await qmp.execute('migrate', { uri: target.uri }, QMP_TIMEOUT_MS);
      }
      info = await this.follow(qmp, vmId, started, timeoutMs, options);
    } catch (err) {
      await this.keepRunningHere(qmp, vmId);
      const { migratingTo: _dropped, ...state } = current.state;
      await this.ctx.store.writeState(vmId, { config, handle: { ...current, state } } satisfies QemuVmState);
      qmp.close();
      throw new Error(
        `VM ${vmId}: migration ${this.ctx.hostName} -> ${target.host} failed; it runs on here`,
        {
          cause: err,
        },
      );
    }
    qmp.close();
    const result: MigrationResult = {
      vmId,
      from: this.ctx.hostName,
      to: target.host,
      totalTimeMs: info['total-time'] ?? Date.now() - started,
      downtimeMs: info.downtime ?? 0,
      ramTransferredBytes: info.ram?.transferred ?? 0,
      diskTransferredBytes: info.disk?.transferred ?? 0,
    };
    // The target owns the VM now: recorded before the source QEMU goes, so nothing restarts it here and a
    // retry after a crash from here on only finishes the cleanup.
    const moved: VmHandle = {
      ...marked,
      host: target.host,
      state: {
        ...marked.state,
        migratingTo: target.uri,
        migratedTo: target.host,
        migrationResult: JSON.stringify(result),
      },
    };
    await this.ctx.store.writeState(vmId, { config, handle: moved } satisfies QemuVmState);
    await this.leave(config, moved, paths);
    this.log.info({ ...result }, 'migration completed');
    return result;
  }

  /**
   * The status of this VM's migration to `target` when QEMU still runs it or has completed it (a retry
   * after a worker restart), undefined when there is none to follow. Throws when it ended in failure
   * while no worker followed it. The mark tells ours apart from the incoming migration that brought the
   * VM here, which QEMU also reports as completed; only an outgoing one leaves the VM in 'postmigrate'.
   */
  private async ourMigration(
    qmp: QmpClient,
    current: VmHandle,
    target: IncomingVm,
  ): Promise<string | undefined> {
    if (current.state.migratingTo !== target.uri) return undefined;
    const { status = 'none', 'error-desc': why } = await qmp.execute<QueryMigrate>(
      'query-migrate',
      undefined,
      QMP_TIMEOUT_MS,
    );
    if (IN_PROGRESS.has(status)) return status;
    const run = await qmp.execute<{ status: string }>('query-status', undefined, QMP_TIMEOUT_MS);
    if (status === 'completed' && run.status === 'postmigrate') return status;
    if (status === 'failed' || status === 'cancelled')
      throw new Error(
        `the migration to ${target.host} ended ${status} while no worker followed it${why ? `: ${why}` : ''}`,
      );
    return undefined;
  }

  /** After the memory went: ends the paused source QEMU and its tap, and the folder unless it holds the disks. */
  private async leave(config: VmConfig, moved: VmHandle, paths: VmPaths): Promise<void> {
    const pid = Number(moved.state.pid);
    if (await isVmProcess(pid, paths.qmpSocket)) await this.quit(pid, paths);
    const nic = nicFromState(moved.state);
    if (nic) await removeVmTap(this.wrap, nic.tap);
    // What the guest printed here waits for the task's logs (activities/host/consoleSegments.ts).
    await setConsoleAside(paths.consoleLog, departedConsoleOf(this.ctx.store.root, config.vmId));
    if (moved.storageHost !== this.ctx.hostName) await this.ctx.store.remove(config.vmId);
  }

  private async follow(
    qmp: QmpClient,
    vmId: string,
    started: number,
    timeoutMs: number,
    options: MigrationOptions,
  ): Promise<QueryMigrate> {
    for (;;) {
      const info = await qmp.execute<QueryMigrate>('query-migrate', undefined, QMP_TIMEOUT_MS);
      const status = info.status ?? 'none';
      options.onProgress?.({
        status,
        transferredBytes: info.ram?.transferred ?? 0,
        remainingBytes: info.ram?.remaining ?? 0,
        totalBytes: info.ram?.total ?? 0,
        elapsedMs: Date.now() - started,
      });
      if (status === 'completed') return info;
      if (FINAL_STATES.has(status) || status === 'none')
        throw new Error(
          `QEMU reports migration ${status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`,
        );
      const why = options.signal?.aborted
        ? 'aborted'
        : Date.now() - started > timeoutMs
          ? `not done after ${timeoutMs} ms`
          : undefined;
      if (why) {
        await qmp.execute('migrate_cancel', undefined, QMP_TIMEOUT_MS);
        throw new Error(`migration of VM ${vmId} cancelled: ${why}`);
      }
      await sleep(POLL_MS, options.signal);
    }
  }

  /** After a failed or cancelled migration: waits for QEMU to settle, and resumes the guest if paused. */
  private async keepRunningHere(qmp: QmpClient, vmId: string): Promise<void> {
    try {
      for (let i = 0; i < 50; i++) {
        const info = await qmp.execute<QueryMigrate>('query-migrate', undefined, QMP_TIMEOUT_MS);
        if (!IN_PROGRESS.has(info.status ?? '') && info.status !== 'cancelling') break;
        await sleep(POLL_MS);
      }
      const { status } = await qmp.execute<{ status: string }>('query-status', undefined, QMP_TIMEOUT_MS);
      // Its memory went out: the target may run it now, and resuming here would make two running copies.
      if (status === 'postmigrate')
        this.log.error({ vmId }, 'the VM left this host after all: not resuming it here');
      else if (status !== 'running') {
        this.log.warn({ vmId, status }, 'VM paused after the failed migration: resuming it');
        await qmp.execute('cont', undefined, QMP_TIMEOUT_MS);
      }
    } catch (err) {
      this.log.error({ vmId, err: describeError(err) }, 'cannot check the VM after a failed migration');
    }
  }

  private async quit(pid: number, paths: VmPaths): Promise<void> {
    try {
      await qmpCommand(paths.qmpSocket, 'quit', undefined, QMP_TIMEOUT_MS);
    } catch (err) {
      this.log.debug({ err: describeError(err) }, 'QMP quit failed');
    }
    if (await waitForExit(pid, paths.qmpSocket, QUIT_TIMEOUT_MS)) return;
    try {
      process.kill(pid, 'SIGKILL');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
    }
    if (!(await waitForExit(pid, paths.qmpSocket, QUIT_TIMEOUT_MS)))
      throw new Error(`source QEMU ${pid} survived SIGKILL`);
  }

  /** On the target: waits until the guest runs here, then records the VM as this host's. */
  async finishIncoming(incoming: IncomingVm): Promise<VmHandle> {
    const vmId = incoming.vmId;
    const paths = this.ctx.store.paths(vmId);
    const record = await this.readIncoming(vmId);
    if (!record) {
      const saved = await this.ctx.store.readState<QemuVmState>(vmId);
      if (
        saved?.handle.host === this.ctx.hostName &&
        (await isVmProcess(Number(saved.handle.state.pid), paths.qmpSocket))
      )
        return saved.handle;
      throw new Error(`VM ${vmId}: no incoming migration on ${this.ctx.hostName}`);
    }
    const pid = Number(record.incoming.handle.state.pid);
    const deadline = Date.now() + RESUME_TIMEOUT_MS;
    for (;;) {
      if (!(await isVmProcess(pid, paths.qmpSocket))) {
        // The guest may have run its task to the end here before anyone took it over: a normal end.
        if ((await new ConsoleFollower(paths.consoleLog).poll()).exitCode !== undefined) break;
        throw new Error(`VM ${vmId}: the incoming QEMU on ${this.ctx.hostName} is gone`);
      }
      // A busy QEMU may miss one exchange while it activates the disks: only the deadline is final.
      const status = await qmpCommand<{ status: string }>(
        paths.qmpSocket,
        'query-status',
        undefined,
        QMP_TIMEOUT_MS,
      ).then(
        (s) => s.status,
        (err: unknown) => {
          if (Date.now() > deadline) throw err;
          this.log.warn({ vmId, err: describeError(err) }, 'incoming QEMU did not answer: asking again');
          return 'inmigrate';
        },
      );
      if (status === 'running') break;
      if (status !== 'inmigrate' && status !== 'paused' && status !== 'prelaunch')
        throw new Error(`VM ${vmId}: incoming QEMU is in state ${status}`);
      if (Date.now() > deadline)
        throw new Error(`VM ${vmId}: incoming VM not running after ${RESUME_TIMEOUT_MS} ms (${status})`);
      await sleep(POLL_MS);
    }
    const handle = record.incoming.handle;
    await this.ctx.store.writeState(vmId, { config: record.source.config, handle } satisfies QemuVmState);
    await fs.writeFile(startedMarkerOf(paths.dir), '');
    await fs.rm(this.incomingFile(vmId), { force: true });
    this.log.info({ vmId, host: this.ctx.hostName, pid }, 'VM runs here after migration');
    return handle;
  }

  /** On the target: stops the incoming QEMU and removes its files; the disks are never touched. */
  async abortIncoming(incoming: IncomingVm): Promise<void> {
    const vmId = incoming.vmId;
    const paths = this.ctx.store.paths(vmId);
    const record = await this.readIncoming(vmId);
    if (!record) return;
    const pid = await readPidFile(pidFileOf(paths));
    if (pid && (await isVmProcess(pid, paths.qmpSocket))) {
      const status = await qmpCommand<{ status: string }>(
        paths.qmpSocket,
        'query-status',
        undefined,
        QMP_TIMEOUT_MS,
      ).then(
        (s) => s.status,
        () => 'unreachable',
      );
      if (status === 'running')
        throw new Error(
          `VM ${vmId} already runs on ${this.ctx.hostName}: finish the migration instead of aborting it`,
        );
      process.kill(pid, 'SIGKILL');
      if (!(await waitForExit(pid, paths.qmpSocket, QUIT_TIMEOUT_MS)))
        throw new Error(`VM ${vmId}: incoming QEMU ${pid} survived SIGKILL`);
    }
    const nic = nicFromState(record.incoming.handle.state);
    if (nic) await removeVmTap(this.wrap, nic.tap);
    if (record.source.handle.storageHost === this.ctx.hostName) {
      // Home of the disks: keep the folder, drop only what the incoming QEMU left.
      for (const f of [paths.qmpSocket, pidFileOf(paths), this.incomingFile(vmId)])
        await fs.rm(f, { force: true });
    } else {
      await this.ctx.store.remove(vmId);
    }
    this.log.info({ vmId, host: this.ctx.hostName }, 'incoming VM aborted');
  }

  private readonly wrap = (cmd: string, args: string[]): { cmd: string; args: string[] } =>
    this.ctx.netns ? inNetns(this.ctx.netns, cmd, args) : { cmd, args };
}

function withoutHostPorts(state: VmHandle['state']): VmHandle['state'] {
  return Object.fromEntries(Object.entries(state).filter(([k]) => !k.startsWith('hostPort:')));
}

/**
 * The overlay names its base image by an absolute path on the storage host; a remote host opens the base
 * over NFS instead, as a separate read-only node the root drive uses as its backing.
 */
function overrideBacking(
  args: string[],
  rootFile: string,
  base: { driver: string; file: Record<string, unknown> },
): void {
  const i = args.findIndex((a) => a.startsWith(`file=${rootFile},`));
  if (i < 0 || args[i - 1] !== '-drive')
    throw new Error(`no root -drive for ${rootFile} in the QEMU arguments`);
  args[i] = `${args[i]},backing=${BASE_NODE}`;
  const node = {
    driver: base.driver,
    'node-name': BASE_NODE,
    'read-only': true,
    file: { ...base.file, 'read-only': true },
  };
  args.splice(i - 1, 0, '-blockdev', JSON.stringify(node));
}
