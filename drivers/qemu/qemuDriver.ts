import { promises as fs } from 'node:fs';
import path from 'node:path';
import { inNetns } from '../../deploy/devcluster/netns';
import { createLogger, describeError } from '../../logging/logger';
import type { ClusterStorage } from '../../storage/diskLocator';
import type { VmPaths, VmStore } from '../../storage/vmStore';
import { endedGuestStatus } from '../guestWait';
import { claimStart, startedMarkerOf, startingHandle, wasStarted, type SavedVm } from '../savedVm';
import { StoredVmDriver } from '../storedVmDriver';
import { applyCpuShare, hostCgroupCpu, removeCpuGroup } from '../cpuShare';
import type { ExitResult, MigratableDriver, VmConfig, VmHandle, VmStatus, WaitOptions } from '../types';
import type { CpuShare, DiskLocalizingDriver } from '../types';
import { checkVmConfig } from '../vmConfigCheck';
import { createRootOverlay, requireDataDisk, writeTaskCommand } from '../vmDisks';
import { hostTscKhz, probeAccelerator, type Accelerator } from './accelerator';
import type { Appliance } from './appliance';
import {
  buildQemuArgs,
  chooseMachine,
  controlSocketOf,
  pidFileOf,
  qemuLogOf,
  recordedMachine,
  vmLaunch,
  type HostMachine,
  type QemuLaunch,
} from './commandLine';
import { ConsoleFollower } from './consoleLog';
import { QemuDiskMirror } from './diskMirror';
import { QemuMigration } from './migration';
import {
  asAccount,
  checkReachable,
  DEFAULT_QEMU_USER,
  giveToAccount,
  resolveQemuAccount,
  type QemuAccount,
} from './qemuAccount';
import { QMP_TIMEOUT_MS, qmpCommand } from './qmp';
import {
  consoleHasLine,
  QemuSnapshots,
  RESUMED_LINE,
  sendStartMessage,
  type SnapshotShape,
} from './snapshot';
import {
  addVmTap,
  chooseVmNic,
  nicFromState,
  nicState,
  removeVmTap,
  validateVmNetwork,
  type VmNetworkOptions,
} from './vmNetwork';
import { readPidFile } from '../processLiveness';
import { freeLocalPort, isVmProcess, killVmProcess, startDetached, waitForExit } from './vmProcess';

// Shared by every VM driver (drivers/vmOutcome.ts); still exported here for the callers that import them from here.
export { TIMEOUT_EXIT_CODE, VmMigratedError } from '../vmOutcome';

export interface QemuDriverOptions {
  store: VmStore;
  hostName: string;
  appliance: Appliance;
  accel?: 'auto' | Accelerator;
  /** The host's TSC frequency in kHz, when /proc/cpuinfo does not tell it (accelerator.ts hostTscKhz). */
  tscKhz?: number;
  qemuBinary?: string;
  /** Poll period of `wait`; progress is reported on every poll. */
  pollMs?: number;
  /** Every host's NFS export (live migration opens remote disks through it). */
  cluster?: ClusterStorage;
  /** Network namespace QEMU runs in (test hosts on one machine, see deploy/devcluster/netns.ts). */
  netns?: string;
  /**
   * VMs with ports get a tap on this cluster network (an address that follows them across migrations)
   * instead of user-mode networking with host port forwards.
   */
  vmNetwork?: VmNetworkOptions;
  /** Production: remote disks are opened under these kernel NFS mounts instead of over nfs://. */
  remoteDisksUnder?: string;
  /** The unprivileged account QEMU runs as (VSP_QEMU_USER); default `vsp-qemu`. */
  qemuUser?: string;
  /**
   * This host's migration credentials (VSP_MIGRATION_TLS_DIR, deploy/migration-tls.sh): migrations to
   * and from this host then go over TLS with the cluster's CA, and a plain stream is refused both ways.
   */
  migrationTlsDir?: string;
  /**
   * Start tasks' VMs from a saved state of the booted appliance instead of booting (snapshot.ts,
   * VSP_QEMU_SNAPSHOTS): built in the background on first need, VMs boot until it exists. VMs with ports
   * always boot (the snapshot has no NIC).
   */
  snapshots?: boolean;
}

/** What the VM folder's state file holds. */
export type QemuVmState = SavedVm;

const HOST_PORT_KEY = 'hostPort:';
const LAUNCH_TIMEOUT_MS = 60_000;
const DESTROY_STOP_TIMEOUT_MS = 10_000;

/** Host ports forwarded to a service VM's guest ports (guest port -> 127.0.0.1 port). */
export function hostPortsOf(handle: VmHandle): Record<number, number> {
  const out: Record<number, number> = {};
  for (const [k, v] of Object.entries(handle.state)) {
    if (k.startsWith(HOST_PORT_KEY)) out[Number(k.slice(HOST_PORT_KEY.length))] = Number(v);
  }
  return out;
}

/**
 * Runs each task in a QEMU VM booted from the appliance kernel + initramfs, with a CoW overlay of the
 * cached base image as root disk and the staged ext4 data disk as the owner's home. QEMU runs detached
 * in its own session, so VMs outlive the worker; every fact needed to re-attach is in the VM folder. It
 * runs as an unprivileged account under its seccomp sandbox, and can write only the VM's own disks,
 * console log and QMP folder.
 */
export class QemuDriver extends StoredVmDriver implements MigratableDriver, DiskLocalizingDriver {
  readonly name = 'qemu';
  protected readonly log = createLogger('qemu-driver');
  private readonly qemuBinary: string;
  protected readonly pollMs: number;
  protected readonly migration: QemuMigration;
  private readonly mirror: QemuDiskMirror;
  private accountOnce: Promise<QemuAccount | undefined> | undefined;
  private machineOnce: Promise<HostMachine> | undefined;
  private readonly snapshots: QemuSnapshots | undefined;

  constructor(private readonly opts: QemuDriverOptions) {
    super(opts);
    this.qemuBinary = opts.qemuBinary ?? 'qemu-system-x86_64';
    // A restored VM's one-second task ends within a few seconds: a 1 s poll would add half a second to it.
    this.pollMs = opts.pollMs ?? 250;
    if (opts.vmNetwork) validateVmNetwork(opts.vmNetwork);
    this.migration = new QemuMigration({
      account: () => this.account(),
      migrationTlsDir: opts.migrationTlsDir,
      remoteDisksUnder: opts.remoteDisksUnder,
      store: opts.store,
      hostName: opts.hostName,
      appliance: opts.appliance,
      qemuBinary: this.qemuBinary,
      cluster: opts.cluster ?? {},
      netns: opts.netns,
      vmNetwork: opts.vmNetwork,
    });
    this.snapshots = opts.snapshots
      ? new QemuSnapshots({
          dir: path.join(opts.store.root, 'snapshots'),
          appliance: opts.appliance,
          qemuBinary: this.qemuBinary,
          account: () => this.account(),
          wrap: this.wrap,
        })
      : undefined;
    this.mirror = new QemuDiskMirror({
      store: opts.store,
      hostName: opts.hostName,
      account: () => this.account(),
    });
  }

  readonly localizeDisks: DiskLocalizingDriver['localizeDisks'] = (handle, options) =>
    this.mirror.localizeDisks(handle, options);

  readonly dropMovedDisks: DiskLocalizingDriver['dropMovedDisks'] = (handle) =>
    this.mirror.dropMovedDisks(handle);

  async create(config: VmConfig): Promise<VmHandle> {
    checkVmConfig(config);
    const paths = this.opts.store.paths(config.vmId);
    const existing = await this.opts.store.readState<QemuVmState>(config.vmId);
    if (existing) return existing.handle;
    const baseImage = config.baseImage as string;
    await requireDataDisk(config.vmId, paths.dataDisk);
    await createRootOverlay(baseImage, paths.rootDisk);
    await writeTaskCommand(paths, config.command);
    const handle: VmHandle = {
      driver: this.name,
      vmId: config.vmId,
      host: this.opts.hostName,
      storageHost: this.opts.hostName,
      state: {
        pidFile: pidFileOf(paths),
        qmpSocket: paths.qmpSocket,
        consoleLog: paths.consoleLog,
        memoryMiB: config.memoryMiB,
        vcpus: config.vcpus,
        baseImage,
      },
    };
    await this.opts.store.writeState(config.vmId, { config, handle } satisfies QemuVmState);
    this.log.info({ vmId: config.vmId, baseImage }, 'VM created');
    return handle;
  }

  async start(handle: VmHandle): Promise<VmHandle> {
    const { config, handle: current } = await this.readState(handle.vmId);
    const paths = this.opts.store.paths(handle.vmId);
    // Exactly once: whoever creates the marker boots the VM; a retry finds it and boots nothing.
    if (!(await claimStart(paths.dir))) {
      this.log.info({ vmId: handle.vmId }, 'VM already started: not booting it again');
      return current;
    }
    try {
      return await this.launch(config, current, paths);
    } catch (err) {
      // QEMU reports launch errors before the guest runs: nothing ran, so a retry may boot it.
      await fs.rm(startedMarkerOf(paths.dir), { force: true });
      throw err;
    }
  }

  /**
   * Builds this host's snapshot for VMs of this shape (memory, vCPUs, base image) unless it exists; the
   * VMs started after it restore from it. Resolves with the snapshot's folder.
   */
  async buildSnapshot(shape: Omit<SnapshotShape, keyof HostMachine>): Promise<string> {
    if (!this.snapshots) throw new Error(`snapshots are off on host ${this.opts.hostName}`);
    return this.snapshots.build({ ...shape, ...(await this.hostMachine()) });
  }

  /**
   * The accelerator and machine this host's VMs start on, and the TSC frequency a TCG microvm kernel is
   * told (recorded with each VM: a migration target builds the same machine).
   */
  private hostMachine(): Promise<HostMachine> {
    // Once per driver: a host fact, and a snapshot key hashes it (a re-read /proc/cpuinfo must not move it).
    this.machineOnce ??= this.probeHostMachine();
    return this.machineOnce.catch((err: unknown) => {
      this.machineOnce = undefined;
      throw err;
    });
  }

  private async probeHostMachine(): Promise<HostMachine> {
    const accel =
      this.opts.accel && this.opts.accel !== 'auto'
        ? this.opts.accel
        : await probeAccelerator(this.opts.appliance.vmlinuz, undefined, this.qemuBinary);
    const tscKhz = accel === 'tcg' ? (this.opts.tscKhz ?? (await hostTscKhz())) : undefined;
    return {
      accel,
      machine: chooseMachine(accel, this.opts.appliance, tscKhz),
      ...(tscKhz ? { tscKhz } : {}),
    };
  }

  private async launch(
    config: VmConfig,
    current: VmHandle,
    paths: VmPaths,
    mayRestore = true,
  ): Promise<VmHandle> {
    const host = await this.hostMachine();
    const { accel, machine, tscKhz } = host;
    const nic =
      this.opts.vmNetwork && config.ports.length > 0
        ? await chooseVmNic(
            config.vmId,
            this.opts.vmNetwork,
            this.wrap,
            await this.addressesInStore(config.vmId),
          )
        : undefined;
    const portForwards: Record<number, number> = {};
    if (!nic) for (const port of config.ports) portForwards[port] = await freeLocalPort();
    const restore =
      this.snapshots && mayRestore && config.ports.length === 0
        ? await this.snapshots
            .lookup({
              ...host,
              memoryMiB: config.memoryMiB,
              vcpus: config.vcpus,
              baseImage: String(current.state.baseImage),
            })
            .catch((err: unknown) => {
              this.log.warn({ vmId: config.vmId, err: describeError(err) }, 'no snapshot: booting');
              return undefined;
            })
        : undefined;
    const handle = startingHandle(current, this.opts.hostName, config, {
      accel,
      machine,
      ...(tscKhz ? { tscKhz } : {}),
      ...Object.fromEntries(Object.entries(portForwards).map(([g, h]) => [`${HOST_PORT_KEY}${g}`, h])),
      ...(nic ? nicState(nic) : {}),
      ...(restore ? { snapshot: restore.key } : {}),
    });
    await this.opts.store.writeState(config.vmId, { config, handle } satisfies QemuVmState);
    await fs.rm(paths.qmpSocket, { force: true });
    const account = await this.account();
    await checkReachable(account, paths.dir);
    await giveToAccount(account, {
      disks: [paths.rootDisk, paths.dataDisk],
      consoleLog: paths.consoleLog,
      runDir: paths.runDir,
    });
    const launch = vmLaunch(config, this.opts.appliance, paths, {
      accel,
      machine,
      tscKhz,
      portForwards,
      nic,
    });
    const args = [...buildQemuArgs(launch), ...(restore ? ['-incoming', 'fd:3'] : [])];
    const qemu = asAccount(account, this.qemuBinary, args);
    if (nic && this.opts.vmNetwork) await addVmTap(this.wrap, this.opts.vmNetwork.bridge, nic.tap, account);
    let pid: number;
    // QEMU reads the saved state from this descriptor: its account needs no access to the snapshot.
    const saved = restore ? await fs.open(restore.state, 'r') : undefined;
    try {
      pid = await startDetached(this.wrap(qemu.cmd, qemu.args), {
        qmpSocket: paths.qmpSocket,
        logFile: qemuLogOf(paths),
        pidFile: pidFileOf(paths),
        timeoutMs: LAUNCH_TIMEOUT_MS,
        fds: saved ? [saved.fd] : undefined,
      });
    } catch (err) {
      if (nic) await removeVmTap(this.wrap, nic.tap);
      if (restore) return this.bootInstead(config, current, paths, restore.key, err);
      throw new Error(`VM ${config.vmId}: cannot start QEMU`, { cause: err });
    } finally {
      await saved?.close();
    }
    handle.state.pid = pid;
    await this.opts.store.writeState(config.vmId, { config, handle } satisfies QemuVmState);
    if (restore) {
      const failed = await this.resume(handle, paths, launch);
      if (failed) {
        await this.killQemu(pid, paths);
        return this.bootInstead(config, current, paths, restore.key, failed);
      }
    }
    this.log.info(
      {
        vmId: config.vmId,
        pid,
        accel,
        machine,
        portForwards,
        address: nic?.address,
        user: account?.user,
        snapshot: restore?.key,
      },
      restore ? 'VM started from its snapshot' : 'VM started',
    );
    return handle;
  }

  /** A snapshot that does not restore is dropped (the next VM rebuilds it); this VM boots. */
  private async bootInstead(
    config: VmConfig,
    current: VmHandle,
    paths: VmPaths,
    key: string,
    why: unknown,
  ): Promise<VmHandle> {
    this.log.warn({ vmId: config.vmId, key, err: describeError(why) }, 'snapshot did not restore: booting');
    await this.snapshots?.discard(key);
    await fs.truncate(paths.consoleLog, 0);
    return this.launch(config, current, paths, false);
  }

  /** Hands a restored guest its start message; returns the error when it cannot. */
  private async resume(handle: VmHandle, paths: VmPaths, launch: QemuLaunch): Promise<unknown> {
    const vm = {
      pid: Number(handle.state.pid),
      qmpSocket: paths.qmpSocket,
      controlSocket: controlSocketOf(paths),
      consoleLog: paths.consoleLog,
    };
    try {
      await sendStartMessage(vm, launch);
    } catch (err) {
      return err;
    }
    handle.state.resumed = true;
    const { config } = await this.readState(handle.vmId);
    await this.opts.store.writeState(handle.vmId, { config, handle } satisfies QemuVmState);
    return undefined;
  }

  async wait(handle: VmHandle, options: WaitOptions): Promise<ExitResult> {
    const paths = this.opts.store.paths(handle.vmId);
    const { config, handle: current } = await this.readState(handle.vmId);
    // A worker that died between a restore and its start message: the guest still waits for it.
    if (
      current.state.snapshot &&
      !current.state.resumed &&
      current.host === this.opts.hostName &&
      !(await consoleHasLine(paths.consoleLog, RESUMED_LINE))
    ) {
      const failed = await this.resume(
        current,
        paths,
        vmLaunch(config, this.opts.appliance, paths, {
          ...recordedMachine(current.state),
          portForwards: hostPortsOf(current),
          nic: nicFromState(current.state),
        }),
      );
      // The guest still waits; the wait below reports it when QEMU is gone, else the time limit ends it.
      if (failed)
        this.log.warn({ vmId: handle.vmId, err: describeError(failed) }, 'cannot resume the restored VM');
    }
    return this.waitForGuest(
      current,
      {
        consoleLog: paths.consoleLog,
        probe: async () => {
          const pid = await this.pidOf(current, paths);
          const alive = await isVmProcess(pid, paths.qmpSocket);
          return {
            exists: pid !== undefined && alive,
            running: alive,
            endedWhy: 'QEMU exited before the task finished (killed?)',
            details: { pid: pid ?? 0, accelerator: String(current.state.accel) },
          };
        },
        waitGone: async (timeoutMs) =>
          waitForExit((await this.pidOf(current, paths)) ?? 0, paths.qmpSocket, timeoutMs),
      },
      DESTROY_STOP_TIMEOUT_MS,
      options,
    );
  }

  async inspect(handle: VmHandle): Promise<VmStatus> {
    const saved = await this.opts.store.readState<QemuVmState>(handle.vmId);
    if (!saved) return { phase: 'missing', details: { reason: 'no VM folder on this host' } };
    const paths = this.opts.store.paths(handle.vmId);
    const { handle: current, config } = saved;
    const details: VmStatus['details'] = {
      accelerator: String(current.state.accel ?? 'not started'),
      memoryMiB: config.memoryMiB,
      vcpus: config.vcpus,
      rootDisk: paths.rootDisk,
      dataDisk: paths.dataDisk,
    };
    for (const [g, h] of Object.entries(hostPortsOf(current))) details[`${HOST_PORT_KEY}${g}`] = h;
    if (!(await wasStarted(paths.dir))) return { phase: 'created', details };
    const pid = await this.pidOf(current, paths);
    const alive = await isVmProcess(pid, paths.qmpSocket);
    const cons = await new ConsoleFollower(paths.consoleLog).poll();
    if (alive) {
      details.pid = pid as number;
      try {
        const st = await qmpCommand<{ status: string }>(
          paths.qmpSocket,
          'query-status',
          undefined,
          QMP_TIMEOUT_MS,
        );
        details.qmpStatus = st.status;
      } catch (err) {
        details.qmpStatus = `unreachable: ${describeError(err)}`;
      }
      return { phase: 'running', progress: cons.progress, progressMessage: cons.progressMessage, details };
    }
    return endedGuestStatus(cons, details, 'QEMU is not running and the task reported no exit');
  }

  async recover(handle: VmHandle): Promise<VmStatus> {
    const status = await this.inspect(handle);
    this.log.info({ vmId: handle.vmId, phase: status.phase, pid: status.details.pid }, 're-attached to VM');
    return status;
  }

  async stop(handle: VmHandle, timeoutMs: number): Promise<void> {
    const paths = this.opts.store.paths(handle.vmId);
    const saved = await this.opts.store.readState<QemuVmState>(handle.vmId);
    const pid = await this.pidOf(saved?.handle ?? handle, paths);
    if (!pid || !(await isVmProcess(pid, paths.qmpSocket))) return;
    const half = Math.max(0, Math.floor(timeoutMs / 2));
    // Graceful: ACPI power button, then QEMU's own quit, then SIGKILL.
    for (const command of ['system_powerdown', 'quit']) {
      try {
        await qmpCommand(paths.qmpSocket, command, undefined, Math.min(QMP_TIMEOUT_MS, Math.max(half, 500)));
      } catch (err) {
        this.log.debug({ vmId: handle.vmId, command, err: describeError(err) }, 'QMP command failed');
      }
      if (await waitForExit(pid, paths.qmpSocket, half)) return;
    }
    this.log.warn({ vmId: handle.vmId, pid }, 'VM did not stop in time: killing QEMU');
    await this.killQemu(pid, paths);
  }

  private async killQemu(pid: number, paths: VmPaths): Promise<void> {
    if (!(await killVmProcess(pid, paths.qmpSocket)))
      throw new Error(`VM ${path.basename(paths.dir)}: QEMU ${pid} survived SIGKILL`);
  }

  async destroy(handle: VmHandle): Promise<void> {
    await this.stop(handle, DESTROY_STOP_TIMEOUT_MS);
    const saved = await this.opts.store.readState<QemuVmState>(handle.vmId);
    const nic = nicFromState((saved?.handle ?? handle).state);
    // A VM that migrated away has its tap on the other host; a same-named tap here is then not ours.
    if (nic && (saved?.handle ?? handle).host === this.opts.hostName) await removeVmTap(this.wrap, nic.tap);
    await this.opts.store.remove(handle.vmId);
    await removeCpuGroup(await hostCgroupCpu(), handle.vmId).catch(() => undefined);
    this.log.info({ vmId: handle.vmId }, 'VM destroyed');
  }

  /** The QEMU process (every vCPU thread with it) goes into the VM's cgroup with the share. */
  async setCpuShare(handle: VmHandle, share: CpuShare): Promise<void> {
    const paths = this.opts.store.paths(handle.vmId);
    const pid = await this.pidOf(handle, paths);
    if (!pid || !(await isVmProcess(pid, paths.qmpSocket)))
      throw new Error(
        `VM ${handle.vmId} does not run on host ${this.opts.hostName}: its CPU share cannot change`,
      );
    await applyCpuShare(await hostCgroupCpu(), handle.vmId, [pid], share);
    this.log.info({ vmId: handle.vmId, pid, ...share }, 'CPU share set');
  }

  /** QEMU's account, resolved once (a missing account fails each start with the same clear error). */
  private account(): Promise<QemuAccount | undefined> {
    this.accountOnce ??= resolveQemuAccount(this.opts.qemuUser ?? DEFAULT_QEMU_USER);
    return this.accountOnce.catch((err: unknown) => {
      this.accountOnce = undefined;
      throw err;
    });
  }

  /** Command words that run `cmd` in this host's network namespace (if any). */
  private readonly wrap = (cmd: string, args: string[]) =>
    this.opts.netns ? inNetns(this.opts.netns, cmd, args) : { cmd, args };

  /** VM-network addresses held by the other VMs of this host's store (address -> VM id). */
  private async addressesInStore(except: string): Promise<Map<string, string>> {
    const held = new Map<string, string>();
    for (const vmId of await this.opts.store.list()) {
      if (vmId === except) continue;
      const saved = await this.opts.store.readState<QemuVmState>(vmId).catch(() => undefined);
      const nic = saved && nicFromState(saved.handle.state);
      if (nic) held.set(nic.address, vmId);
    }
    return held;
  }

  /** The pid from the handle, else from QEMU's pid file (a worker may have died right after launch). */
  private async pidOf(handle: VmHandle, paths: VmPaths): Promise<number | undefined> {
    const pid = Number(handle.state.pid);
    if (Number.isInteger(pid) && pid > 1) return pid;
    return readPidFile(pidFileOf(paths));
  }
}
