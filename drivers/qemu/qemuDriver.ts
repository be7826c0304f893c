import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { inNetns } from '../../deploy/devcluster/netns';
import { createLogger, describeError } from '../../logging/logger';
import { OWNER_NAME } from '../../spec/repoPath';
import type { ClusterStorage } from '../../storage/diskLocator';
import type { VmPaths, VmStore } from '../../storage/vmStore';
import type {
  DriverCapabilities,
  ExitResult,
  IncomingVm,
  MigratableDriver,
  MigrationOptions,
  MigrationResult,
  MigrationSource,
  VmConfig,
  VmHandle,
  VmStatus,
  WaitOptions,
} from '../types';
import { probeAccelerator, type Accelerator } from './accelerator';
import type { Appliance } from './appliance';
import { buildQemuArgs, pidFileOf, vmLaunch } from './commandLine';
import { ConsoleFollower, consoleTail } from './consoleLog';
import { QemuMigration } from './migration';
import { qmpCommand } from './qmp';
import { runCommand } from './runCommand';
import {
  addVmTap,
  chooseVmNic,
  nicFromState,
  nicState,
  removeVmTap,
  validateVmNetwork,
  type VmNetworkOptions,
} from './vmNetwork';
import { freeLocalPort, isVmProcess, readPidFile, sleep, waitForExit } from './vmProcess';

export interface QemuDriverOptions {
  store: VmStore;
  hostName: string;
  appliance: Appliance;
  accel?: 'auto' | Accelerator;
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
}

/** What the VM folder's state file holds: enough to re-attach from any worker. */
export interface QemuVmState {
  config: VmConfig;
  handle: VmHandle;
}

/** Exit code reported when the time limit ended the task (as coreutils `timeout` does). */
export const TIMEOUT_EXIT_CODE = 124;
const HOST_PORT_KEY = 'hostPort:';
const LAUNCH_TIMEOUT_MS = 60_000;
/** After VSP-EXIT the guest powers off by itself; give it this long before forcing. */
const POWEROFF_GRACE_MS = 15_000;
const DESTROY_STOP_TIMEOUT_MS = 10_000;
const QMP_TIMEOUT_MS = 3_000;

/** Host ports forwarded to a service VM's guest ports (guest port -> 127.0.0.1 port). */
export function hostPortsOf(handle: VmHandle): Record<number, number> {
  const out: Record<number, number> = {};
  for (const [k, v] of Object.entries(handle.state)) {
    if (k.startsWith(HOST_PORT_KEY)) out[Number(k.slice(HOST_PORT_KEY.length))] = Number(v);
  }
  return out;
}

/** `wait` on the host a VM left by live migration: the task goes on at `to`, so wait there. */
export class VmMigratedError extends Error {
  constructor(
    readonly vmId: string,
    readonly from: string,
    readonly to: string,
  ) {
    super(`VM ${vmId} was migrated from ${from} to ${to}: wait for it there`);
    this.name = 'VmMigratedError';
  }
}

/**
 * Runs each task in a QEMU VM booted from the appliance kernel + initramfs, with a CoW overlay of the
 * cached base image as root disk and the staged ext4 data disk as the owner's home. QEMU runs
 * daemonized, so VMs outlive the worker; every fact needed to re-attach is in the VM folder.
 */
export class QemuDriver implements MigratableDriver {
  readonly name = 'qemu';
  readonly capabilities: DriverCapabilities = {
    liveMigration: true,
    isolation: 'vm',
    homeStaging: 'disk-image',
  };
  private readonly log = createLogger('qemu-driver');
  private readonly qemuBinary: string;
  private readonly pollMs: number;
  private readonly migration: QemuMigration;

  constructor(private readonly opts: QemuDriverOptions) {
    this.qemuBinary = opts.qemuBinary ?? 'qemu-system-x86_64';
    this.pollMs = opts.pollMs ?? 1000;
    if (opts.vmNetwork) validateVmNetwork(opts.vmNetwork);
    this.migration = new QemuMigration({
      store: opts.store,
      hostName: opts.hostName,
      appliance: opts.appliance,
      qemuBinary: this.qemuBinary,
      cluster: opts.cluster ?? {},
      netns: opts.netns,
      vmNetwork: opts.vmNetwork,
    });
  }

  async create(config: VmConfig): Promise<VmHandle> {
    validateConfig(config);
    const paths = this.opts.store.paths(config.vmId);
    const existing = await this.opts.store.readState<QemuVmState>(config.vmId);
    if (existing) return existing.handle;
    const baseImage = config.baseImage as string;
    await fs.access(paths.dataDisk).catch((err: unknown) => {
      throw new Error(`VM ${config.vmId}: data disk ${paths.dataDisk} is missing: stage the inputs first`, {
        cause: err,
      });
    });
    await this.createRootOverlay(baseImage, paths.rootDisk);
    await writeCommandFile(paths, config.command);
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
    try {
      await (await fs.open(startedMarkerOf(paths), 'wx')).close();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
        this.log.info({ vmId: handle.vmId }, 'VM already started: not booting it again');
        return current;
      }
      throw err;
    }
    try {
      return await this.launch(config, current, paths);
    } catch (err) {
      // QEMU reports launch errors before the guest runs: nothing ran, so a retry may boot it.
      await fs.rm(startedMarkerOf(paths), { force: true });
      throw err;
    }
  }

  private async launch(config: VmConfig, current: VmHandle, paths: VmPaths): Promise<VmHandle> {
    const accel =
      this.opts.accel && this.opts.accel !== 'auto'
        ? this.opts.accel
        : await probeAccelerator(this.opts.appliance.vmlinuz, undefined, this.qemuBinary);
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
    const startedAt = Date.now();
    const handle: VmHandle = {
      ...current,
      host: this.opts.hostName,
      state: {
        ...current.state,
        accel,
        startedAt,
        deadline: startedAt + config.timeLimitSec * 1000,
        ...Object.fromEntries(Object.entries(portForwards).map(([g, h]) => [`${HOST_PORT_KEY}${g}`, h])),
        ...(nic ? nicState(nic) : {}),
      },
    };
    await this.opts.store.writeState(config.vmId, { config, handle } satisfies QemuVmState);
    await fs.rm(paths.qmpSocket, { force: true });
    const args = buildQemuArgs(vmLaunch(config, this.opts.appliance, paths, { accel, portForwards, nic }));
    const launch = this.wrap(this.qemuBinary, args);
    if (nic && this.opts.vmNetwork) await addVmTap(this.wrap, this.opts.vmNetwork.bridge, nic.tap);
    try {
      await runCommand(launch.cmd, launch.args, { timeoutMs: LAUNCH_TIMEOUT_MS });
    } catch (err) {
      if (nic) await removeVmTap(this.wrap, nic.tap);
      throw err;
    }
    const pid = await readPidFile(pidFileOf(paths));
    if (!pid) throw new Error(`VM ${config.vmId}: QEMU started but wrote no pid file`);
    handle.state.pid = pid;
    await this.opts.store.writeState(config.vmId, { config, handle } satisfies QemuVmState);
    this.log.info({ vmId: config.vmId, pid, accel, portForwards, address: nic?.address }, 'VM started');
    return handle;
  }

  async wait(handle: VmHandle, options: WaitOptions): Promise<ExitResult> {
    const paths = this.opts.store.paths(handle.vmId);
    const { handle: current } = await this.readState(handle.vmId);
    const follower = new ConsoleFollower(paths.consoleLog);
    const deadline = Number(current.state.deadline);
    for (;;) {
      if (options.signal.aborted)
        throw new Error(`waiting for VM ${handle.vmId} was aborted`, { cause: options.signal.reason });
      const pid = await this.pidOf(current, paths);
      const alive = await isVmProcess(pid, paths.qmpSocket);
      // Read the console after the liveness check: a VM that printed VSP-EXIT and died is seen exiting.
      const cons = await follower.poll();
      if (cons.exitCode !== undefined) {
        if (pid && alive && !(await waitForExit(pid, paths.qmpSocket, POWEROFF_GRACE_MS))) {
          this.log.warn({ vmId: handle.vmId }, 'guest did not power off after VSP-EXIT: stopping it');
          await this.stop(current, DESTROY_STOP_TIMEOUT_MS);
        }
        return { exitCode: cons.exitCode, timedOut: false };
      }
      if (!alive) {
        const movedTo = await this.migratedAway(handle.vmId);
        if (movedTo !== undefined) throw new VmMigratedError(handle.vmId, this.opts.hostName, movedTo);
        const why = cons.guestError
          ? `the guest init failed: ${cons.guestError}`
          : 'QEMU exited before the task finished (killed?)';
        throw new Error(`VM ${handle.vmId}: ${why}; console tail:\n${await consoleTail(paths.consoleLog)}`);
      }
      if (Number.isFinite(deadline) && Date.now() >= deadline) {
        this.log.warn({ vmId: handle.vmId }, 'time limit reached: stopping the VM');
        await this.stop(current, DESTROY_STOP_TIMEOUT_MS);
        return { exitCode: TIMEOUT_EXIT_CODE, timedOut: true };
      }
      options.onProgress({
        phase: 'running',
        progress: cons.progress,
        progressMessage: cons.progressMessage,
        details: { pid: pid ?? 0, accelerator: String(current.state.accel), taskStarted: cons.started },
      });
      await sleep(this.pollMs, options.signal);
    }
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
    const started = await fs.access(startedMarkerOf(paths)).then(
      () => true,
      () => false,
    );
    if (!started) return { phase: 'created', details };
    const pid = await this.pidOf(current, paths);
    const alive = await isVmProcess(pid, paths.qmpSocket);
    const cons = await new ConsoleFollower(paths.consoleLog).poll();
    const progress = { progress: cons.progress, progressMessage: cons.progressMessage };
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
      return { phase: 'running', ...progress, details };
    }
    if (cons.exitCode !== undefined)
      return { phase: 'exited', exitCode: cons.exitCode, ...progress, details };
    details.reason = cons.guestError ?? 'QEMU is not running and the task reported no exit';
    return { phase: 'missing', ...progress, details };
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
    try {
      process.kill(pid, 'SIGKILL');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
    }
    if (!(await waitForExit(pid, paths.qmpSocket, 5000)))
      throw new Error(`VM ${handle.vmId}: QEMU ${pid} survived SIGKILL`);
  }

  async destroy(handle: VmHandle): Promise<void> {
    await this.stop(handle, DESTROY_STOP_TIMEOUT_MS);
    const saved = await this.opts.store.readState<QemuVmState>(handle.vmId);
    const nic = nicFromState((saved?.handle ?? handle).state);
    // A VM that migrated away has its tap on the other host; a same-named tap here is then not ours.
    if (nic && (saved?.handle ?? handle).host === this.opts.hostName) await removeVmTap(this.wrap, nic.tap);
    await this.opts.store.remove(handle.vmId);
    this.log.info({ vmId: handle.vmId }, 'VM destroyed');
  }

  describeForMigration(handle: VmHandle): Promise<MigrationSource> {
    return this.migration.describeForMigration(handle);
  }

  prepareIncoming(source: MigrationSource): Promise<IncomingVm> {
    return this.migration.prepareIncoming(source);
  }

  migrate(handle: VmHandle, target: IncomingVm, options: MigrationOptions): Promise<MigrationResult> {
    return this.migration.migrate(handle, target, options);
  }

  finishIncoming(incoming: IncomingVm): Promise<VmHandle> {
    return this.migration.finishIncoming(incoming);
  }

  abortIncoming(incoming: IncomingVm): Promise<void> {
    return this.migration.abortIncoming(incoming);
  }

  /** Command words that run `cmd` in this host's network namespace (if any). */
  private readonly wrap = (cmd: string, args: string[]) =>
    this.opts.netns ? inNetns(this.opts.netns, cmd, args) : { cmd, args };

  /** The host a VM left this one for by live migration (undefined: it did not leave). */
  private async migratedAway(vmId: string): Promise<string | undefined> {
    const saved = await this.opts.store.readState<QemuVmState>(vmId);
    if (!saved) return 'another host';
    return saved.handle.host !== this.opts.hostName ? saved.handle.host : undefined;
  }

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

  private async readState(vmId: string): Promise<QemuVmState> {
    const saved = await this.opts.store.readState<QemuVmState>(vmId);
    if (!saved) throw new Error(`VM ${vmId} does not exist on ${this.opts.hostName}: create it first`);
    return saved;
  }

  /** The pid from the handle, else from QEMU's pid file (a worker may have died right after launch). */
  private async pidOf(handle: VmHandle, paths: VmPaths): Promise<number | undefined> {
    const pid = Number(handle.state.pid);
    if (Number.isInteger(pid) && pid > 1) return pid;
    return readPidFile(pidFileOf(paths));
  }

  private async createRootOverlay(baseImage: string, rootDisk: string): Promise<void> {
    if (
      await fs.access(rootDisk).then(
        () => true,
        () => false,
      )
    )
      return;
    const info = await runCommand('qemu-img', ['info', '--output=json', baseImage], { timeoutMs: 30_000 });
    const format = (JSON.parse(info.stdout) as { format: string }).format;
    const tmp = `${rootDisk}.${process.pid}.tmp`;
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', baseImage, '-F', format, tmp], {
      timeoutMs: 30_000,
    });
    await fs.rename(tmp, rootDisk);
  }
}

export function startedMarkerOf(paths: VmPaths): string {
  return path.join(paths.dir, 'started');
}

function validateConfig(c: VmConfig): void {
  const bad: string[] = [];
  if (!OWNER_NAME.test(c.owner)) bad.push(`owner ${JSON.stringify(c.owner)} is not a valid owner name`);
  if (!c.command) bad.push('command is empty');
  if (!Number.isInteger(c.vcpus) || c.vcpus < 1 || c.vcpus > os.cpus().length * 4)
    bad.push(`vcpus ${c.vcpus} is out of range`);
  if (!Number.isInteger(c.memoryMiB) || c.memoryMiB < 64) bad.push(`memoryMiB ${c.memoryMiB} is below 64`);
  if (!Number.isInteger(c.timeLimitSec) || c.timeLimitSec < 1)
    bad.push(`timeLimitSec ${c.timeLimitSec} must be >= 1`);
  if (!c.baseImage || !path.isAbsolute(c.baseImage))
    bad.push('baseImage must be the absolute path of a cached image');
  for (const p of c.ports)
    if (!Number.isInteger(p) || p < 1 || p > 65535) bad.push(`port ${p} is out of range`);
  if (bad.length > 0) throw new Error(`invalid VM config for ${c.vmId}: ${bad.join('; ')}`);
}

/** Puts the command on the data disk as .vsp/command, with debugfs (no mount). */
async function writeCommandFile(paths: VmPaths, command: string): Promise<void> {
  const local = path.join(paths.dir, 'command');
  await fs.writeFile(local, command.endsWith('\n') ? command : `${command}\n`);
  const script = [`mkdir /.vsp`, `rm /.vsp/command`, `write "${local}" /.vsp/command`].join('\n');
  const scriptFile = path.join(paths.dir, 'command.debugfs');
  await fs.writeFile(scriptFile, script + '\n');
  try {
    await runCommand('debugfs', ['-w', '-f', scriptFile, paths.dataDisk], { timeoutMs: 30_000 });
    const check = await runCommand('debugfs', ['-R', 'cat /.vsp/command', paths.dataDisk], {
      timeoutMs: 30_000,
    });
    if (check.stdout !== (await fs.readFile(local, 'utf8')))
      throw new Error(`could not write .vsp/command on ${paths.dataDisk}: ${check.stderr.trim()}`);
  } finally {
    await fs.rm(scriptFile, { force: true });
  }
}
