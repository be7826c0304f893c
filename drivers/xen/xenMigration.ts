import { promises as fs } from 'node:fs';
import { createLogger, describeError } from '../../logging/logger';
import { resolveUnderMounts, type ClusterStorage } from '../../storage/diskLocator';
import type { VmStore } from '../../storage/vmStore';
import { MigrationRecords } from '../migrationRecords';
import { processStartTime } from '../processLiveness';
import { runCommand } from '../../lib/runCommand';
import { sleep } from '../qemu/vmProcess';
import { ConsoleFollower } from '../qemu/consoleLog';
import { diskRefsOf, startedMarkerOf } from '../savedVm';
import type { IncomingVm, MigrationOptions, MigrationResult, MigrationSource, VmHandle } from '../types';
import { domainName } from './domainConfig';
import type { LoopDisks } from './loopDisks';
import type { XenConsole } from './xenConsole';
import type { XenVmState } from './xenDriver';
import { MigrateOutput } from './migrateOutput';
import { bytesWrittenByChildren, domainState, shutdownReason, xlMigrationOf, type XlRunner } from './xl';

/**
 * Live migration of Xen domains with `xl migrate`, mapped onto VSP's protocol. xl drives the whole
 * transfer from the source over ssh (`<sshCommand> <target> xl migrate-receive`): the target's xl creates
 * `<name>--incoming`, receives memory, and renames it to `<name>` once it runs. So the target's own steps
 * only check and record: `prepareIncoming` checks that the disks are reachable under its mounts and
 * records the incoming VM; `finishIncoming` waits for the domain and makes it this host's; `abortIncoming`
 * destroys a half-received `--incoming` domain. The domain config travels with the memory, and names disks
 * by their mounted paths, the same on both hosts: no disk byte is sent.
 */

export interface XenMigrationContext {
  store: VmStore;
  hostName: string;
  mountRoot: string;
  cluster: ClusterStorage;
  xl: XlRunner;
  /** Where xl logs each domain (xl-<name>.log): why a guest that died during a migration did. */
  xlLogDir: string;
  sshCommand: string;
  console: XenConsole;
  disks: LoopDisks;
}

const DEFAULT_TIMEOUT_MS = 10 * 60_000;
const PROGRESS_MS = 500;
/** The process that writes the memory stream (comm is cut to 15 characters). */
const SAVE_HELPER = 'libxl-save-help';
const XL_TIMEOUT_MS = 60_000;
const RESUME_TIMEOUT_MS = 30_000;
const POLL_MS = 200;
const REACH_TIMEOUT_MS = 10_000;
const SSH_URI = /^ssh:(\d{1,3}(?:\.\d{1,3}){3})$/;
/** How a failed migration's error says that its guest died during it (what callers may test for). */
export const GUEST_DIED = 'the guest died during it';

export class XenMigration extends MigrationRecords {
  private readonly log = createLogger('xen-migration');

  constructor(private readonly ctx: XenMigrationContext) {
    super(ctx);
  }

  async describeForMigration(handle: VmHandle): Promise<MigrationSource> {
    const { config, handle: current } = await this.readState(handle.vmId);
    if (current.host !== this.ctx.hostName)
      throw new Error(`VM ${handle.vmId} does not run on ${this.ctx.hostName} (it runs on ${current.host})`);
    const disks = diskRefsOf(current);
    if (!disks) throw new Error(`VM ${handle.vmId}: its handle names no disk locators`);
    return { config, handle: current, disks };
  }

  /** On the target: checks the disks are reachable here and records the VM xl is about to send. */
  async prepareIncoming(source: MigrationSource): Promise<IncomingVm> {
    const { config, handle: from, disks } = source;
    const vmId = config.vmId;
    const self = this.ctx.hostName;
    if (from.driver !== 'xen') throw new Error(`VM ${vmId} runs under driver '${from.driver}', not xen`);
    if (from.vmId !== vmId) throw new Error(`migration source names VM ${from.vmId} and config ${vmId}`);
    if (from.host === self) throw new Error(`VM ${vmId} already runs on ${self}: pick another target host`);
    const endpoint = this.ctx.cluster[self];
    if (!endpoint) throw new Error(`host ${self} has no address in the cluster configuration`);
    const existing = await this.readIncoming(vmId);
    if (existing) return existing.incoming;
    if (await domainState(this.ctx.xl, domainName(vmId)))
      throw new Error(`VM ${vmId} already runs on ${self} (a domain ${domainName(vmId)} exists)`);
    const files = { root: resolveUnderMounts(disks.root, this.ctx.mountRoot), data: '' };
    files.data = resolveUnderMounts(disks.data, this.ctx.mountRoot);
    for (const disk of [disks.root, disks.data, ...(disks.base ? [disks.base] : [])]) {
      const file = resolveUnderMounts(disk, this.ctx.mountRoot);
      // In a child process with a time bound: on a hard NFS mount of a host that is down, a stat here would
      // block one of the worker's own I/O threads until that host comes back.
      await runCommand('stat', ['--format=%s', '--', file], { timeoutMs: REACH_TIMEOUT_MS }).catch(
        (err: unknown) => {
          throw new Error(
            `VM ${vmId}: ${file} is not reachable on ${self}: the NFS export of ${disk.storageHost} is not mounted or does not answer`,
            { cause: err },
          );
        },
      );
    }
    const incoming: IncomingVm = {
      vmId,
      host: self,
      uri: `ssh:${endpoint.address}`,
      handle: {
        ...from,
        host: self,
        state: { ...from.state, consoleLog: this.ctx.store.paths(vmId).consoleLog, migratedFrom: from.host },
      },
    };
    // The domain xl receives names its disks by links, the same on both hosts: attach them here first.
    await this.ctx.disks.attach(vmId, files);
    const paths = this.ctx.store.paths(vmId);
    await fs.mkdir(paths.dir, { recursive: true });
    // The received domain's console lands in this host's VM folder, as a new segment of the task's console.
    await this.ctx.console.attach(vmId, 'incoming');
    await this.writeIncoming(vmId, { source, incoming });
    this.log.info({ vmId, uri: incoming.uri }, 'ready to receive the VM');
    return incoming;
  }

  /**
   * On the source: `xl migrate` to the target. xl keeps the domain here until the target runs it, and
   * resumes it here when the transfer fails. xl has no downtime or bandwidth settings; its verbose output
   * (migrateOutput.ts) gives the figures: the memory sent, and the downtime, from the moment the guest was
   * suspended here to the moment the target reported it running.
   */
  async migrate(handle: VmHandle, target: IncomingVm, options: MigrationOptions): Promise<MigrationResult> {
    const vmId = handle.vmId;
    const self = this.ctx.hostName;
    const { config, handle: current } = await this.readState(vmId);
    if (current.host !== self)
      throw new Error(`VM ${vmId} does not run on ${self} (its state says ${current.host})`);
    if (target.host === self) throw new Error(`VM ${vmId}: cannot migrate a VM to its own host`);
    const address = SSH_URI.exec(target.uri)?.[1];
    if (!address)
      throw new Error(`VM ${vmId}: target URI ${JSON.stringify(target.uri)} is not ssh:<IPv4 address>`);
    const name = domainName(vmId);
    const output = new MigrateOutput(config.memoryMiB * 1024 * 1024);
    const result = (): MigrationResult => ({
      vmId,
      from: self,
      to: target.host,
      ...output.figures(),
      diskTransferredBytes: 0,
    });
    if (current.state.migratingTo === target.uri) {
      // A retry after our restart: the xl that sends the VM outlives the worker; wait for it to end.
      const pid = await xlMigrationOf(name);
      if (pid !== undefined) await this.waitForExit(pid, vmId, options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
      // xl removes the source domain only once the target runs it.
      if (!(await domainState(this.ctx.xl, name))) {
        await this.leave(config, current, target.host);
        return result();
      }
      await this.keepRunningHere(name, vmId);
    }
    if (!(await domainState(this.ctx.xl, name)))
      throw new Error(`VM ${vmId} is not running on ${self}: nothing to migrate`);
    if (options.downtimeLimitMs !== undefined || options.maxBandwidthBytesPerSec !== undefined)
      this.log.info({ vmId }, 'xl migrate has no downtime or bandwidth limit: using its defaults');
    await this.ctx.store.writeState(vmId, {
      config,
      handle: { ...current, state: { ...current.state, migratingTo: target.uri } },
    } satisfies XenVmState);
    let xlPid: number | undefined;
    let scanning = false;
    // The heartbeat goes out on every tick with the last count: a /proc scan on a dom0 that the migration
    // itself keeps busy can take longer than a tick, and scans piling up behind one another starved it.
    const report = () => {
      options.onProgress?.(output.progress());
      if (xlPid === undefined || scanning) return;
      scanning = true;
      void bytesWrittenByChildren(xlPid, SAVE_HELPER)
        .then(
          (bytes) => output.sent(bytes),
          () => undefined,
        )
        .finally(() => (scanning = false));
    };
    report();
    const ticker = setInterval(report, PROGRESS_MS);
    this.log.info({ vmId, to: target.host, address }, 'migration started');
    try {
      // -vvv: libxl's debug lines say when the guest is suspended (the start of the downtime).
      await this.ctx.xl(['-vvv', 'migrate', '-s', this.ctx.sshCommand, name, address], {
        timeoutMs: options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
        signal: options.signal,
        onStderrLine: (line) => output.add(line),
        onSpawn: (pid) => (xlPid = pid),
      });
    } catch (err) {
      // xl -vvv's whole output goes to this worker's log; the error keeps xl's error lines (or, when xl said
      // none, why it ended: killed at its time limit, aborted).
      const why = output.failure() ?? (err as Error).message;
      this.log.error({ vmId, to: target.host, err: String(err) }, 'xl migrate failed');
      const died = await this.keepRunningHere(name, vmId);
      await this.ctx.store.writeState(vmId, { config, handle: current } satisfies XenVmState);
      // xl reports a guest that died mid-migration as one that would not suspend: say which it was.
      const where = died ? `${GUEST_DIED} (${died})` : 'it runs on here';
      throw new Error(`VM ${vmId}: migration ${self} -> ${target.host} failed; ${where}: ${why}`);
    } finally {
      clearInterval(ticker);
    }
    output.completed();
    options.onProgress?.(output.progress());
    await this.leave(config, current, target.host);
    const r = result();
    this.log.info({ ...r }, 'migration completed');
    return r;
  }

  private async waitForExit(pid: number, vmId: string, timeoutMs: number): Promise<void> {
    this.log.info({ vmId, pid }, 'an xl migrate of this VM still runs: waiting for it');
    const deadline = Date.now() + timeoutMs;
    while ((await processStartTime(pid)) !== undefined) {
      if (Date.now() > deadline)
        throw new Error(`VM ${vmId}: xl migrate (pid ${pid}) still runs after ${timeoutMs} ms`);
      await sleep(POLL_MS);
    }
  }

  /** After the VM left: the storage host keeps its folder (marked moved), any other host drops it. */
  private async leave(config: XenVmState['config'], current: VmHandle, to: string): Promise<void> {
    const vmId = current.vmId;
    if (current.storageHost === this.ctx.hostName) {
      const moved: VmHandle = { ...current, host: to, state: { ...current.state, migratedTo: to } };
      await this.ctx.store.writeState(vmId, { config, handle: moved } satisfies XenVmState);
    }
    await this.ctx.disks.detach(vmId);
    // What the guest printed here waits for the task's logs (activities/host/consoleSegments.ts).
    await this.ctx.console.setAside(vmId);
    if (current.storageHost !== this.ctx.hostName) await this.ctx.store.remove(vmId);
  }

  /** After a failed migration: a domain left paused here is resumed. */
  /** Resumes a domain left paused; returns why it is not running when it died, else undefined. */
  private async keepRunningHere(name: string, vmId: string): Promise<string | undefined> {
    try {
      const state = await domainState(this.ctx.xl, name);
      if (state === 'paused') {
        this.log.warn({ vmId }, 'domain paused after the failed migration: resuming it');
        await this.ctx.xl(['unpause', name], { timeoutMs: XL_TIMEOUT_MS });
      } else if (!state) {
        this.log.error({ vmId }, 'the domain is gone from the source after a failed migration');
      } else if (state === 'shutdown' || state === 'crashed') {
        const reason = (await shutdownReason(this.ctx.xl, this.ctx.xlLogDir, name)) ?? state;
        this.log.error({ vmId, reason }, 'the guest died during the failed migration');
        return reason;
      }
    } catch (err) {
      this.log.error({ vmId, err: describeError(err) }, 'cannot check the domain after a failed migration');
    }
    return undefined;
  }

  /** On the target: waits until xl has renamed the received domain and it runs; records it here. */
  async finishIncoming(incoming: IncomingVm): Promise<VmHandle> {
    const vmId = incoming.vmId;
    const name = domainName(vmId);
    const record = await this.readIncoming(vmId);
    if (!record) {
      const saved = await this.ctx.store.readState<XenVmState>(vmId);
      if (saved?.handle.host === this.ctx.hostName && (await domainState(this.ctx.xl, name)))
        return saved.handle;
      throw new Error(`VM ${vmId}: no incoming migration on ${this.ctx.hostName}`);
    }
    const paths = this.ctx.store.paths(vmId);
    const deadline = Date.now() + RESUME_TIMEOUT_MS;
    let domid: number | undefined;
    for (;;) {
      const state = await domainState(this.ctx.xl, name);
      if (state === 'running') {
        domid = Number((await this.ctx.xl(['domid', name], { timeoutMs: XL_TIMEOUT_MS })).stdout.trim());
        break;
      }
      // The guest may have run its task to the end here before anyone took it over: a normal end.
      if (!state && (await new ConsoleFollower(paths.consoleLog).poll()).exitCode !== undefined) break;
      if (state && state !== 'paused') throw new Error(`VM ${vmId}: the received domain is ${state}`);
      if (Date.now() > deadline)
        throw new Error(
          `VM ${vmId}: domain ${name} not running on ${this.ctx.hostName} after ${RESUME_TIMEOUT_MS} ms`,
        );
      await sleep(POLL_MS);
    }
    const handle: VmHandle = {
      ...record.incoming.handle,
      state: { ...record.incoming.handle.state, ...(domid !== undefined ? { domid } : {}) },
    };
    await this.ctx.store.writeState(vmId, { config: record.source.config, handle } satisfies XenVmState);
    await fs.writeFile(startedMarkerOf(paths.dir), '');
    await fs.rm(this.incomingFile(vmId), { force: true });
    this.log.info({ vmId, host: this.ctx.hostName, domid }, 'VM runs here after migration');
    return handle;
  }

  /** On the target: destroys a half-received domain and drops the record; the disks are never touched. */
  async abortIncoming(incoming: IncomingVm): Promise<void> {
    const vmId = incoming.vmId;
    const name = domainName(vmId);
    const record = await this.readIncoming(vmId);
    if (!record) return;
    if ((await domainState(this.ctx.xl, name)) === 'running')
      throw new Error(
        `VM ${vmId} already runs on ${this.ctx.hostName}: finish the migration instead of aborting it`,
      );
    for (const partial of [`${name}--incoming`, name]) {
      if (await domainState(this.ctx.xl, partial))
        await this.ctx.xl(['destroy', partial], { timeoutMs: XL_TIMEOUT_MS });
    }
    await this.ctx.disks.detach(vmId);
    await this.ctx.console.detach(vmId);
    if (record.source.handle.storageHost === this.ctx.hostName)
      await fs.rm(this.incomingFile(vmId), { force: true });
    else await this.ctx.store.remove(vmId);
    this.log.info({ vmId, host: this.ctx.hostName }, 'incoming VM aborted');
  }
}
