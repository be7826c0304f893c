import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createLogger } from '../../logging/logger';
import {
  locatorOf,
  resolveUnderMounts,
  validateMountRoot,
  type ClusterStorage,
} from '../../storage/diskLocator';
import type { VmStore } from '../../storage/vmStore';
import { writeFileAtomic } from '../../storage/durableFile';
import { endedGuestStatus } from '../guestWait';
import type { Appliance } from '../qemu/appliance';
import { ConsoleFollower } from '../qemu/consoleLog';
import { nicState, validateVmNetwork, vmNicOf, type VmNetworkOptions } from '../qemu/vmNetwork';
import { sleep } from '../qemu/vmProcess';
import { claimStart, startedMarkerOf, startingHandle, wasStarted, type SavedVm } from '../savedVm';
import { StoredVmDriver } from '../storedVmDriver';
import type {
  CpuShare,
  DriverCapabilities,
  ExitResult,
  MigratableDriver,
  VmConfig,
  VmHandle,
  VmStatus,
  WaitOptions,
} from '../types';
import { xlSchedCreditArgs } from '../cpuShare';
import { checkVmConfig } from '../vmConfigCheck';
import { giveDisks } from '../qemu/qemuAccount';
import { createRawRoot, requireDataDisk, writeTaskCommand } from '../vmDisks';
import { domainName, renderDomainConfig, type XenGuestType } from './domainConfig';
import { XenConsole } from './xenConsole';
import { LoopDisks } from './loopDisks';
import { XenMigration } from './xenMigration';
import {
  checkToolstack,
  DEFAULT_XL_LOG_DIR,
  domainState,
  shutdownReason,
  xlRunner,
  type DomainState,
  type XlRunner,
} from './xl';

export interface XenDriverOptions {
  store: VmStore;
  hostName: string;
  appliance: Appliance;
  /** Where every host's store is mounted (deploy/production/storagePlan.ts), e.g. /var/lib/vsp/cluster. */
  mountRoot: string;
  /** Every host's export; its address is where the host receives migrations (over ssh). */
  cluster?: ClusterStorage;
  /** Runs xl; default `xl` from PATH. */
  xl?: XlRunner;
  /** xenconsoled's guest log folder (`xenconsoled --log=guest --log-dir=...`): `guest-<domain>.log` in it. */
  consoleLogDir?: string;
  /** Where xl logs each domain it creates (`xl-<domain>.log`: why it shut down); default /var/log/xen. */
  xlLogDir?: string;
  /** 'pvh' (default, live-migratable) or 'pv' (no live migration, see domainConfig.ts). */
  guestType?: XenGuestType;
  /** The physical CPUs guests may run on (domainConfig.ts `cpus`); default any. */
  guestCpus?: string;
  /** `xl migrate -s`: how to reach the target's xl (a shell command xl runs as `<cmd> <host> xl migrate-receive`). */
  sshCommand?: string;
  /** VMs with ports get a vif on this bridge with the VM's stable MAC and address. */
  vmNetwork?: VmNetworkOptions;
  /** Poll period of `wait`. */
  pollMs?: number;
  /** The domains' loop devices and hotplug script (default: under /run/vsp/xen, real losetup). */
  loopDisks?: LoopDisks;
  /**
   * The account the stores' exports squash a peer's root to (the cluster file's qemuAccount): the VM's
   * disks are given to it, so the loop devices of another host (root there, that account here) can
   * still write them after a migration.
   */
  diskOwner?: { uid: number; gid: number };
}

/** What the VM folder's state file holds. */
export type XenVmState = SavedVm;

/** The VM's root disk: raw (see createRawRoot), beside the data disk. */
export const rawRootOf = (vmDir: string): string => path.join(vmDir, 'root.img');

/**
 * How `xl migrate` reaches the target. Keepalives end the transfer within 30 s of the target vanishing (a
 * power cut sends no FIN or RST: without them the sender waits out TCP's retransmissions, about 15 min,
 * possibly with the guest suspended), so the VM resumes at the source and the failure is reported.
 */
export const DEFAULT_SSH_COMMAND =
  'ssh -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=5 -o ServerAliveCountMax=6';
const XL_TIMEOUT_MS = 60_000;
/** Building a domain takes 3-60 s under TCG on a loaded machine (decompressing the kernel, the backends). */
const XL_CREATE_TIMEOUT_MS = 5 * 60_000;
const CREATE_ATTEMPTS = 3;
/** xl's errors when a backend of the domain did not come up in time. */
const BACKEND_TIMEOUT =
  /device model did not start|Post DM startup configs failed|because of timeout|unable to add disk devices/;
const DESTROY_STOP_TIMEOUT_MS = 2_000;
/**
 * Boots of a guest that keeps dying before its task starts (nested TCG: an early triple fault or panic,
 * which Xen reports as a reboot, in about one boot in seven in the virtual cluster).
 */
const MAX_BOOTS = 3;
/** How long a shut-down domain's console may take to reach its log (xenconsoled reads the ring behind). */
const CONSOLE_SETTLE_MS = 5_000;

/**
 * Runs each task in a Xen PVH domain booted from the appliance kernel + initramfs, its disks (a sparse raw
 * copy of the cached base image and the staged ext4 data disk) opened by the kernel's blkback through the
 * per-host NFS mounts, so the same domain config is valid on every host and `xl migrate` moves only
 * memory. Domains outlive the worker (xl runs them in the hypervisor); the VM folder holds what is needed
 * to re-attach. xenconsoled writes the guest's console into the VM folder's console log (xenConsole.ts),
 * where the guest's progress and exit status are read, as under QEMU.
 */
export class XenDriver extends StoredVmDriver implements MigratableDriver {
  readonly name = 'xen';
  override readonly capabilities: DriverCapabilities;
  protected readonly log = createLogger('xen-driver');
  private readonly xl: XlRunner;
  private readonly console: XenConsole;
  private readonly guestType: XenGuestType;
  private readonly xlLogDir: string;
  protected readonly pollMs: number;
  protected readonly migration: XenMigration;
  private readonly disks: LoopDisks;

  constructor(private readonly opts: XenDriverOptions) {
    super(opts);
    validateMountRoot(opts.mountRoot);
    if (opts.vmNetwork) validateVmNetwork(opts.vmNetwork);
    this.xl = opts.xl ?? xlRunner();
    this.console = new XenConsole(opts.store, opts.consoleLogDir);
    this.guestType = opts.guestType ?? 'pvh';
    this.xlLogDir = opts.xlLogDir ?? DEFAULT_XL_LOG_DIR;
    this.capabilities = {
      liveMigration: this.guestType === 'pvh',
      isolation: 'vm',
      homeStaging: 'disk-image',
    };
    this.pollMs = opts.pollMs ?? 1000;
    this.disks = opts.loopDisks ?? new LoopDisks();
    this.migration = new XenMigration({
      disks: this.disks,
      store: opts.store,
      hostName: opts.hostName,
      mountRoot: opts.mountRoot,
      cluster: opts.cluster ?? {},
      xl: this.xl,
      xlLogDir: this.xlLogDir,
      sshCommand: opts.sshCommand ?? DEFAULT_SSH_COMMAND,
      console: this.console,
    });
  }

  /** Fails with a clear error when xl is missing or this is not a Xen dom0 (call at worker start). */
  checkToolstack(): Promise<void> {
    return checkToolstack(this.xl, this.opts.hostName, this.console.logDir);
  }

  async create(config: VmConfig): Promise<VmHandle> {
    checkVmConfig(
      config,
      config.ports.length > 0 && !this.opts.vmNetwork
        ? ['a service VM (ports) needs the cluster VM network under Xen (no user-mode port forwards)']
        : [],
    );
    const existing = await this.opts.store.readState<XenVmState>(config.vmId);
    if (existing) return existing.handle;
    const paths = this.opts.store.paths(config.vmId);
    const self = this.opts.hostName;
    const storeRoot = this.opts.store.root;
    await requireDataDisk(config.vmId, paths.dataDisk);
    // Both disks raw, on the kernel's blkback (xl's `phy` backend, a loop device per disk): no device model
    // per domain, whose start libxl bounds to 10 s, which a busy dom0 misses at a migration's target.
    const rootDisk = rawRootOf(paths.dir);
    await createRawRoot(config.baseImage as string, rootDisk);
    await writeTaskCommand(paths, config.command);
    await giveDisks(this.opts.diskOwner, [rootDisk, paths.dataDisk]);
    const rootRef = locatorOf(self, storeRoot, rootDisk);
    const dataRef = locatorOf(self, storeRoot, paths.dataDisk);
    // The domain opens its disks through the mounts, as on every host the VM may move to.
    await this.mounted(rootRef);
    const handle: VmHandle = {
      driver: this.name,
      vmId: config.vmId,
      host: self,
      storageHost: self,
      state: {
        domain: domainName(config.vmId),
        guestType: this.guestType,
        consoleLog: paths.consoleLog,
        memoryMiB: config.memoryMiB,
        vcpus: config.vcpus,
        baseImage: config.baseImage as string,
        diskRoot: rootRef.path,
        diskData: dataRef.path,
      },
    };
    await this.opts.store.writeState(config.vmId, { config, handle } satisfies XenVmState);
    this.log.info({ vmId: config.vmId, rootDisk }, 'VM created');
    return handle;
  }

  async start(handle: VmHandle): Promise<VmHandle> {
    const { config, handle: current } = await this.readState(handle.vmId);
    const paths = this.opts.store.paths(handle.vmId);
    const name = domainName(handle.vmId);
    // Exactly once: whoever creates the marker creates the domain; a retry finds it and starts nothing.
    if (!(await claimStart(paths.dir))) {
      this.log.info({ vmId: handle.vmId }, 'VM already started: not creating its domain again');
      return current;
    }
    let created = false;
    try {
      if (await domainState(this.xl, name))
        throw new Error(`a domain named ${name} already exists on ${this.opts.hostName}`);
      const nic =
        config.ports.length > 0 && this.opts.vmNetwork
          ? vmNicOf(config.vmId, this.opts.vmNetwork)
          : undefined;
      const links = await this.disks.attach(handle.vmId, {
        root: await this.mounted({ storageHost: current.storageHost, path: String(current.state.diskRoot) }),
        data: await this.mounted({ storageHost: current.storageHost, path: String(current.state.diskData) }),
      });
      const cfg = renderDomainConfig({
        name,
        type: this.guestType,
        memoryMiB: config.memoryMiB,
        vcpus: config.vcpus,
        cpus: this.opts.guestCpus,
        kernel: this.opts.appliance.vmlinuz,
        ramdisk: this.opts.appliance.initrd,
        owner: config.owner,
        rootDisk: links.root,
        dataDisk: links.data,
        hotplugScript: this.disks.script,
        nic: nic && this.opts.vmNetwork ? { ...nic, bridge: this.opts.vmNetwork.bridge } : undefined,
      });
      const cfgFile = path.join(paths.dir, 'domain.cfg');
      await writeFileAtomic(cfgFile, cfg);
      // A fresh console, so an old VSP-EXIT never counts.
      await fs.rm(paths.consoleLog, { force: true });
      await this.console.attach(handle.vmId, 'create');
      // Recorded before the domain exists, so a worker that dies right after still knows its time limit.
      const started = startingHandle(current, this.opts.hostName, config, nic ? nicState(nic) : {});
      await this.opts.store.writeState(config.vmId, { config, handle: started } satisfies XenVmState);
      for (let attempt = 1; ; attempt++) {
        try {
          await this.xl(['create', cfgFile], { timeoutMs: XL_CREATE_TIMEOUT_MS });
          break;
        } catch (err) {
          const ran = await this.ranAnyway(name, paths.consoleLog);
          // The claim stays unless the guest surely never ran: a task must never run twice.
          created = ran !== 'no';
          if (ran === 'yes') {
            this.log.warn(
              { vmId: config.vmId, err: String(err) },
              'xl create failed after the guest ran: keeping it',
            );
            break;
          }
          // libxl gives a domain's backends fixed time limits (hotplug scripts such as the loop
          // device's `block` 10 s), which a busy dom0 misses: nothing ran, so building it again is safe.
          if (ran === 'unknown' || attempt >= CREATE_ATTEMPTS || !BACKEND_TIMEOUT.test(String(err)))
            throw err;
          this.log.warn(
            { vmId: config.vmId, attempt, err: String(err) },
            'xl create failed before the guest ran: again',
          );
        }
      }
      created = true;
      const domid = await this.domidOf(name);
      started.state.domid = domid;
      await this.opts.store.writeState(config.vmId, { config, handle: started } satisfies XenVmState);
      this.log.info({ vmId: config.vmId, domain: name, domid, address: nic?.address }, 'VM started');
      return started;
    } catch (err) {
      // xl reports creation errors before the guest runs: nothing ran, so a retry may start it. Once the
      // domain exists the claim stays, whatever failed after: the task must never run twice.
      if (!created) {
        await this.disks.detach(handle.vmId);
        await fs.rm(startedMarkerOf(paths.dir), { force: true });
      }
      throw new Error(`VM ${handle.vmId}: cannot start its Xen domain`, { cause: err });
    }
  }

  /**
   * After `xl create` failed (or was killed at its time limit): whether the guest ran anyway. xl builds the
   * domain paused and unpauses it last, so a paused domain never ran its guest: it is destroyed ('no'). A
   * domain that runs or has ended ran ('yes'); a gone domain whose console shows the task started, or a
   * domain whose state cannot be read, may have ('unknown').
   */
  private async ranAnyway(name: string, consoleLog: string): Promise<'yes' | 'no' | 'unknown'> {
    let state: Awaited<ReturnType<typeof domainState>>;
    try {
      state = await domainState(this.xl, name);
    } catch (err) {
      this.log.error({ domain: name, err: String(err) }, 'cannot tell whether the failed xl create ran');
      return 'unknown';
    }
    if (state !== undefined && state !== 'paused') return 'yes';
    if ((await new ConsoleFollower(consoleLog).poll()).started) return 'unknown';
    if (state === 'paused') await this.xl(['destroy', name], { timeoutMs: XL_TIMEOUT_MS });
    return 'no';
  }

  async wait(handle: VmHandle, options: WaitOptions): Promise<ExitResult> {
    const { handle: current } = await this.readState(handle.vmId);
    const name = domainName(handle.vmId);
    return this.waitForGuest(
      current,
      {
        consoleLog: this.opts.store.paths(handle.vmId).consoleLog,
        probe: async () => {
          const state = await domainState(this.xl, name);
          if (await this.bootAgainIfNeverStarted(handle.vmId, state))
            return { exists: true, running: true, endedWhy: '', details: { domain: name } };
          // xl removes the domain here once the target runs it, a moment before `migrate` records where it
          // went: while a migration is under way, a missing domain has not ended.
          const saved = state ? undefined : await this.opts.store.readState<XenVmState>(handle.vmId);
          const leaving =
            saved?.handle.host === this.opts.hostName && saved.handle.state.migratingTo !== undefined;
          const running = state === 'running' || state === 'paused' || leaving;
          // A guest that rebooted or crashed is kept (domainConfig.ts): its last lines still reach the log.
          const reason = state && !running ? await this.afterShutdown(name, handle.vmId) : undefined;
          return {
            exists: state !== undefined,
            running,
            endedWhy: `its domain is ${stateAndWhy(state, reason)} before the task finished`,
            details: { domain: name, ...(state ? { domainState: state } : {}) },
          };
        },
        waitGone: (timeoutMs) => this.waitGone(name, timeoutMs),
      },
      DESTROY_STOP_TIMEOUT_MS,
      options,
    );
  }

  async inspect(handle: VmHandle): Promise<VmStatus> {
    const saved = await this.opts.store.readState<XenVmState>(handle.vmId);
    if (!saved) return { phase: 'missing', details: { reason: 'no VM folder on this host' } };
    const { config, handle: current } = saved;
    const paths = this.opts.store.paths(handle.vmId);
    const name = domainName(handle.vmId);
    const details: VmStatus['details'] = {
      domain: name,
      memoryMiB: config.memoryMiB,
      vcpus: config.vcpus,
      storageHost: current.storageHost,
      rootDisk: resolveUnderMounts(
        { storageHost: current.storageHost, path: String(current.state.diskRoot) },
        this.opts.mountRoot,
      ),
    };
    if (!(await wasStarted(paths.dir))) return { phase: 'created', details };
    let state = await domainState(this.xl, name);
    if (await this.bootAgainIfNeverStarted(handle.vmId, state)) state = 'running';
    const cons = await new ConsoleFollower(paths.consoleLog).poll();
    if (state) details.domainState = state;
    if (state === 'running' || state === 'paused')
      return { phase: 'running', progress: cons.progress, progressMessage: cons.progressMessage, details };
    // A guest that rebooted or crashed is kept (domainConfig.ts): say why it stopped.
    const why = state ? await this.afterShutdown(name, handle.vmId) : undefined;
    return endedGuestStatus(
      cons,
      details,
      `the domain is ${stateAndWhy(state, why)} and the task reported no exit`,
    );
  }

  async recover(handle: VmHandle): Promise<VmStatus> {
    const status = await this.inspect(handle);
    this.log.info(
      { vmId: handle.vmId, phase: status.phase, domain: status.details.domain },
      're-attached to VM',
    );
    return status;
  }

  /** The credit scheduler's cap and weight for the VM's domain (`xl sched-credit -c/-w`). */
  async setCpuShare(handle: VmHandle, share: CpuShare): Promise<void> {
    const name = domainName(handle.vmId);
    if (!(await domainState(this.xl, name)))
      throw new Error(
        `VM ${handle.vmId} does not run on host ${this.opts.hostName}: its CPU share cannot change`,
      );
    await this.xl(xlSchedCreditArgs(name, share), { timeoutMs: XL_TIMEOUT_MS });
    this.log.info({ vmId: handle.vmId, domain: name, ...share }, 'CPU share set');
  }

  async stop(handle: VmHandle, timeoutMs: number): Promise<void> {
    const name = domainName(handle.vmId);
    const state = await domainState(this.xl, name);
    if (!state) return;
    // Graceful: the PV shutdown request (the guest powers off), then destroy; a domain that has shut down
    // already (kept after a reboot or crash) is destroyed at once.
    if (state === 'shutdown' || state === 'crashed') return this.destroyDomain(handle.vmId);
    try {
      await this.xl(['shutdown', name], { timeoutMs: XL_TIMEOUT_MS });
    } catch (err) {
      this.log.debug({ vmId: handle.vmId, err: String(err) }, 'xl shutdown failed');
    }
    if (await this.waitGone(name, timeoutMs)) return;
    this.log.warn({ vmId: handle.vmId, domain: name }, 'VM did not stop in time: destroying its domain');
    await this.destroyDomain(handle.vmId);
  }

  /** `xl destroy`, then the domain is gone (or the VM's error says it survived). */
  private async destroyDomain(vmId: string): Promise<void> {
    const name = domainName(vmId);
    await this.xl(['destroy', name], { timeoutMs: XL_TIMEOUT_MS });
    if (!(await this.waitGone(name, 10_000)))
      throw new Error(`VM ${vmId}: domain ${name} survived xl destroy`);
  }

  private async domidOf(name: string): Promise<number> {
    return Number((await this.xl(['domid', name], { timeoutMs: XL_TIMEOUT_MS })).stdout.trim());
  }

  async destroy(handle: VmHandle): Promise<void> {
    await this.stop(handle, DESTROY_STOP_TIMEOUT_MS);
    await this.disks.detach(handle.vmId);
    await this.console.detach(handle.vmId);
    await this.opts.store.remove(handle.vmId);
    this.log.info({ vmId: handle.vmId }, 'VM destroyed');
  }

  /** A disk's path under the mounts; throws when that host's store is not mounted here. */
  private async mounted(loc: { storageHost: string; path: string }): Promise<string> {
    const file = resolveUnderMounts(loc, this.opts.mountRoot);
    await fs.access(file).catch((err: unknown) => {
      throw new Error(
        `${file} is not reachable on ${this.opts.hostName}: is the store of ${loc.storageHost} mounted at ${path.join(this.opts.mountRoot, loc.storageHost)}? (deploy/production/setup-storage.sh)`,
        { cause: err },
      );
    });
    return file;
  }

  /**
   * A guest kept after dying (domainConfig.ts: rebooted or crashed) before its task started ran no task
   * code: it is booted again from the same domain config, with the same disks and console (the failed
   * boot's lines stay above), up to MAX_BOOTS boots in all. True when it was.
   */
  private async bootAgainIfNeverStarted(vmId: string, state: DomainState | undefined): Promise<boolean> {
    if (state !== 'shutdown' && state !== 'crashed') return false;
    const paths = this.opts.store.paths(vmId);
    if ((await new ConsoleFollower(paths.consoleLog).poll()).started) return false;
    const saved = await this.opts.store.readState<XenVmState>(vmId);
    const boots = Number(saved?.handle.state.boots ?? 1);
    // A VM that arrived by migration ran before: its console here starts at its arrival, without VSP-START.
    if (!saved || boots >= MAX_BOOTS || saved.handle.state.migratedFrom !== undefined) return false;
    const name = domainName(vmId);
    const reason = await this.afterShutdown(name, vmId);
    this.log.warn({ vmId, boots, reason }, 'guest died before its task started: booting it again');
    await fs.appendFile(
      paths.consoleLog,
      `\nVSP-HOST boot ${boots} ended before the task started (${reason ?? state}): booting again\n`,
    );
    await this.destroyDomain(vmId);
    const again: VmHandle = { ...saved.handle, state: { ...saved.handle.state, boots: boots + 1 } };
    await this.opts.store.writeState(vmId, { config: saved.config, handle: again } satisfies XenVmState);
    await this.xl(['create', path.join(paths.dir, 'domain.cfg')], { timeoutMs: XL_CREATE_TIMEOUT_MS });
    again.state.domid = await this.domidOf(name);
    await this.opts.store.writeState(vmId, { config: saved.config, handle: again } satisfies XenVmState);
    return true;
  }

  /**
   * Why a kept domain shut down (xl's log of it), once xenconsoled has written the rest of its console:
   * the log stops growing, or CONSOLE_SETTLE_MS passes.
   */
  private async afterShutdown(name: string, vmId: string): Promise<string | undefined> {
    const consoleLog = this.opts.store.paths(vmId).consoleLog;
    const size = () =>
      fs.stat(consoleLog).then(
        (st) => st.size,
        () => 0,
      );
    const deadline = Date.now() + CONSOLE_SETTLE_MS;
    let last = -1;
    let now = await size();
    while (now !== last && Date.now() < deadline) {
      await sleep(500);
      last = now;
      now = await size();
    }
    return shutdownReason(this.xl, this.xlLogDir, name);
  }

  private async waitGone(name: string, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!(await domainState(this.xl, name))) return true;
      if (Date.now() >= deadline) return false;
      await sleep(Math.min(200, this.pollMs));
    }
  }
}

/** "shutdown: crashed", "crashed" (not "crashed: crashed"), "gone". */
function stateAndWhy(state: DomainState | undefined, why: string | undefined): string {
  return `${state ?? 'gone'}${why && why !== state ? `: ${why}` : ''}`;
}
