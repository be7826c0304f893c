import { promises as fs } from 'node:fs';
import { createLogger, describeError } from '../../logging/logger';
import { resolveUnderMounts, type ClusterStorage } from '../../storage/diskLocator';
import type { VmStore } from '../../storage/vmStore';
import { MigrationRecords } from '../migrationRecords';
import { runCommand } from '../qemu/runCommand';
import { sleep } from '../qemu/vmProcess';
import { diskRefsOf, startedMarkerOf } from '../savedVm';
import type { IncomingVm, MigrationOptions, MigrationResult, MigrationSource, VmHandle } from '../types';
import { domainName } from './domainConfig';
import type { XenVmState } from './xenDriver';
import { domainState, type XlRunner } from './xl';

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
  sshCommand: string;
  consoleLogOf: (vmId: string) => string;
}

const DEFAULT_TIMEOUT_MS = 10 * 60_000;
const PROGRESS_MS = 1_000;
const XL_TIMEOUT_MS = 60_000;
const RESUME_TIMEOUT_MS = 30_000;
const POLL_MS = 200;
const REACH_TIMEOUT_MS = 10_000;
const SSH_URI = /^ssh:(\d{1,3}(?:\.\d{1,3}){3})$/;

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
        state: { ...from.state, consoleLog: this.ctx.consoleLogOf(vmId), migratedFrom: from.host },
      },
    };
    const paths = this.ctx.store.paths(vmId);
    await fs.mkdir(paths.dir, { recursive: true });
    await this.writeIncoming(vmId, { source, incoming });
    this.log.info({ vmId, uri: incoming.uri }, 'ready to receive the VM');
    return incoming;
  }

  /**
   * On the source: `xl migrate` to the target. xl keeps the domain here until the target runs it, and
   * resumes it here when the transfer fails. xl has no downtime or bandwidth settings, and reports no byte
   * counts: progress carries the elapsed time, and the RAM figure is the domain's memory (pre-copy sends
   * every page at least once, so it is a lower bound).
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
    const started = Date.now();
    const totalBytes = config.memoryMiB * 1024 * 1024;
    const result = (): MigrationResult => ({
      vmId,
      from: self,
      to: target.host,
      totalTimeMs: Date.now() - started,
      downtimeMs: 0,
      ramTransferredBytes: totalBytes,
      diskTransferredBytes: 0,
    });
    if (!(await domainState(this.ctx.xl, name))) {
      // xl removes the source domain only once the target runs it: a retry after our restart finds it done.
      if (current.state.migratingTo === target.uri) {
        await this.leave(config, current, target.host);
        return result();
      }
      throw new Error(`VM ${vmId} is not running on ${self}: nothing to migrate`);
    }
    if (options.downtimeLimitMs !== undefined || options.maxBandwidthBytesPerSec !== undefined)
      this.log.info({ vmId }, 'xl migrate has no downtime or bandwidth limit: using its defaults');
    await this.ctx.store.writeState(vmId, {
      config,
      handle: { ...current, state: { ...current.state, migratingTo: target.uri } },
    } satisfies XenVmState);
    const report = (status: string) =>
      options.onProgress?.({
        status,
        transferredBytes: status === 'completed' ? totalBytes : 0,
        remainingBytes: status === 'completed' ? 0 : totalBytes,
        totalBytes,
        elapsedMs: Date.now() - started,
      });
    report('active');
    const ticker = setInterval(() => report('active'), PROGRESS_MS);
    this.log.info({ vmId, to: target.host, address }, 'migration started');
    try {
      await this.ctx.xl(['migrate', '-s', this.ctx.sshCommand, name, address], {
        timeoutMs: options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
        signal: options.signal,
      });
    } catch (err) {
      await this.keepRunningHere(name, vmId);
      await this.ctx.store.writeState(vmId, { config, handle: current } satisfies XenVmState);
      throw new Error(`VM ${vmId}: migration ${self} -> ${target.host} failed; it runs on here`, {
        cause: err,
      });
    } finally {
      clearInterval(ticker);
    }
    report('completed');
    await this.leave(config, current, target.host);
    const r = result();
    this.log.info({ ...r }, 'migration completed');
    return r;
  }

  /** After the VM left: the storage host keeps its folder (marked moved), any other host drops it. */
  private async leave(config: XenVmState['config'], current: VmHandle, to: string): Promise<void> {
    const vmId = current.vmId;
    if (current.storageHost === this.ctx.hostName) {
      const moved: VmHandle = { ...current, host: to, state: { ...current.state, migratedTo: to } };
      await this.ctx.store.writeState(vmId, { config, handle: moved } satisfies XenVmState);
    } else {
      await this.ctx.store.remove(vmId);
    }
    await fs.rm(this.ctx.consoleLogOf(vmId), { force: true });
  }

  /** After a failed migration: a domain left paused here is resumed. */
  private async keepRunningHere(name: string, vmId: string): Promise<void> {
    try {
      const state = await domainState(this.ctx.xl, name);
      if (state === 'paused') {
        this.log.warn({ vmId }, 'domain paused after the failed migration: resuming it');
        await this.ctx.xl(['unpause', name], { timeoutMs: XL_TIMEOUT_MS });
      } else if (!state) {
        this.log.error({ vmId }, 'the domain is gone from the source after a failed migration');
      }
    } catch (err) {
      this.log.error({ vmId, err: describeError(err) }, 'cannot check the domain after a failed migration');
    }
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
    const deadline = Date.now() + RESUME_TIMEOUT_MS;
    for (;;) {
      const state = await domainState(this.ctx.xl, name);
      if (state === 'running') break;
      if (state && state !== 'paused') throw new Error(`VM ${vmId}: the received domain is ${state}`);
      if (Date.now() > deadline)
        throw new Error(
          `VM ${vmId}: domain ${name} not running on ${this.ctx.hostName} after ${RESUME_TIMEOUT_MS} ms`,
        );
      await sleep(POLL_MS);
    }
    const domid = (await this.ctx.xl(['domid', name], { timeoutMs: XL_TIMEOUT_MS })).stdout.trim();
    const handle: VmHandle = {
      ...record.incoming.handle,
      state: { ...record.incoming.handle.state, domid: Number(domid) },
    };
    await this.ctx.store.writeState(vmId, { config: record.source.config, handle } satisfies XenVmState);
    await fs.writeFile(startedMarkerOf(this.ctx.store.paths(vmId).dir), '');
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
    if (record.source.handle.storageHost === this.ctx.hostName)
      await fs.rm(this.incomingFile(vmId), { force: true });
    else await this.ctx.store.remove(vmId);
    this.log.info({ vmId, host: this.ctx.hostName }, 'incoming VM aborted');
  }
}
