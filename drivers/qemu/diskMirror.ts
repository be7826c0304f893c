import { promises as fs } from 'node:fs';
import { createLogger } from '../../logging/logger';
import { locatorOf } from '../../storage/diskLocator';
import type { VmPaths, VmStore } from '../../storage/vmStore';
import { readSavedVm } from '../savedVm';
import type { DiskMoveOptions, DiskMoveResult, VmHandle } from '../types';
import { pidFileOf } from './commandLine';
import { giveDisks, type QemuAccount } from './qemuAccount';
import { QMP_TIMEOUT_MS, QmpClient } from './qmp';
import type { QemuVmState } from './qemuDriver';
import { runCommand } from '../../lib/runCommand';
import { readPidFile } from '../processLiveness';
import { isVmProcess, sleep } from './vmProcess';

/**
 * Storage evacuation for QEMU VMs: on the host where a VM runs with its disks on another host's store
 * (opened over nfs://), QMP `drive-mirror` copies each disk, whole (sync=full: the root overlay and its
 * base become one local image), into this host's store while the guest keeps writing; once every mirror
 * is in step, `block-job-complete` switches the drives to the local copies. Only then is this host
 * recorded as the storage host, and only after that may the former one drop its copy.
 */

export interface DiskMirrorContext {
  store: VmStore;
  hostName: string;
  account: () => Promise<QemuAccount | undefined>;
}

/** Defaults for options the caller leaves out. */
export const DISK_MOVE_DEFAULTS = { timeoutMs: 60 * 60_000 };
/** Short: a small disk is in step within a few polls, and the figure would count the wait. */
const POLL_MS = 100;
/** How long the switch of a ready mirror may take before the move counts as failed. */
const SWITCH_TIMEOUT_MS = 60_000;

/** The two disks of a VSP VM, told apart by format (the root overlay is qcow2, the home disk raw). */
const DISKS = [
  { name: 'root', format: 'qcow2', target: (p: VmPaths) => p.rootDisk },
  { name: 'data', format: 'raw', target: (p: VmPaths) => p.dataDisk },
] as const;

interface BlockInfo {
  device: string;
  inserted?: { file: string; image: { format: string; 'virtual-size': number } };
}

interface BlockJob {
  device: string;
  type: string;
  len: number;
  offset: number;
  ready: boolean;
  status?: string;
}

interface Disk {
  name: string;
  jobId: string;
  device: string;
  target: string;
  format: string;
  size: number;
  switched: boolean;
}

export class QemuDiskMirror {
  private readonly log = createLogger('qemu-disk-mirror');

  constructor(private readonly ctx: DiskMirrorContext) {}

  /** On the host where the VM runs: its disks become local files here, while it runs. */
  async localizeDisks(handle: VmHandle, options: DiskMoveOptions): Promise<DiskMoveResult> {
    const vmId = handle.vmId;
    const { config, handle: current } = await readSavedVm(this.ctx.store, vmId, this.ctx.hostName);
    if (current.host !== this.ctx.hostName)
      throw new Error(`VM ${vmId} does not run on ${this.ctx.hostName} (it runs on ${current.host})`);
    const from = String(current.state.localizedFrom ?? current.storageHost);
    if (current.storageHost === this.ctx.hostName)
      return { handle: current, from, bytes: Number(current.state.localizedBytes ?? 0), elapsedMs: 0 };
    const paths = this.ctx.store.paths(vmId);
    const pid = Number(current.state.pid);
    if (!(await isVmProcess(pid, paths.qmpSocket)))
      throw new Error(`VM ${vmId} is not running on ${this.ctx.hostName}: its disks cannot be mirrored`);
    const started = Date.now();
    const timeoutMs = options.timeoutMs ?? DISK_MOVE_DEFAULTS.timeoutMs;
    const qmp = await QmpClient.connect(paths.qmpSocket, QMP_TIMEOUT_MS);
    let disks: Disk[] = [];
    try {
      disks = await this.disksOf(qmp, vmId, paths);
      for (const d of disks) if (!d.switched) await this.startMirror(qmp, d);
      await this.untilReady(qmp, vmId, disks, started, timeoutMs, options);
      await this.switchOver(qmp, vmId, disks);
    } catch (err) {
      await this.giveUp(qmp, disks);
      throw new Error(
        `VM ${vmId}: its disks could not move from ${current.storageHost} to ${this.ctx.hostName}; they stay there`,
        { cause: err },
      );
    } finally {
      qmp.close();
    }
    const bytes = disks.reduce((n, d) => n + d.size, 0);
    const relative = (file: string) => locatorOf(this.ctx.hostName, this.ctx.store.root, file).path;
    // The root image holds its base now: nothing of the former storage host is needed any more.
    const { baseImage: _base, ...state } = current.state;
    const moved: VmHandle = {
      ...current,
      storageHost: this.ctx.hostName,
      state: {
        ...state,
        diskRoot: relative(paths.rootDisk),
        diskData: relative(paths.dataDisk),
        diskBase: '',
        localizedFrom: current.storageHost,
        localizedBytes: bytes,
      },
    };
    await this.ctx.store.writeState(vmId, { config, handle: moved } satisfies QemuVmState);
    const elapsedMs = Date.now() - started;
    this.log.info({ vmId, from: current.storageHost, bytes, elapsedMs }, 'disks moved here');
    return { handle: moved, from: current.storageHost, bytes, elapsedMs };
  }

  /** The VM's two drives as QEMU has them, with whether each already runs on its local copy. */
  private async disksOf(qmp: QmpClient, vmId: string, paths: VmPaths): Promise<Disk[]> {
    const blocks = await qmp.execute<BlockInfo[]>('query-block', undefined, QMP_TIMEOUT_MS);
    return DISKS.map((want) => {
      const found = blocks.filter((b) => b.inserted?.image.format === want.format);
      if (found.length !== 1)
        throw new Error(
          `VM ${vmId}: expected one ${want.format} drive (${want.name}), QEMU has ${found.length}`,
        );
      const b = found[0];
      const target = want.target(paths);
      return {
        name: want.name,
        jobId: `vsp-localize-${want.name}`,
        device: b.device,
        target,
        format: want.format,
        size: b.inserted?.image['virtual-size'] ?? 0,
        switched: b.inserted?.file === target,
      };
    });
  }

  /** Follows a mirror already under way (a retried step), or starts one into a fresh local image. */
  private async startMirror(qmp: QmpClient, d: Disk): Promise<void> {
    const jobs = await qmp.execute<BlockJob[]>('query-block-jobs', undefined, QMP_TIMEOUT_MS);
    if (jobs.some((j) => j.device === d.jobId)) return;
    await fs.rm(d.target, { force: true });
    if (d.format === 'qcow2')
      await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', d.target, String(d.size)]);
    else {
      const file = await fs.open(d.target, 'wx', 0o600);
      await file.truncate(d.size).finally(() => file.close());
    }
    await giveDisks(await this.ctx.account(), [d.target]);
    await qmp.execute(
      'drive-mirror',
      {
        'job-id': d.jobId,
        device: d.device,
        target: d.target,
        format: d.format,
        mode: 'existing',
        sync: 'full',
      },
      QMP_TIMEOUT_MS,
    );
    this.log.info({ disk: d.name, device: d.device, target: d.target, bytes: d.size }, 'mirror started');
  }

  /** Waits until every mirror is in step with its source, reporting the bytes copied. */
  private async untilReady(
    qmp: QmpClient,
    vmId: string,
    disks: Disk[],
    started: number,
    timeoutMs: number,
    options: DiskMoveOptions,
  ): Promise<void> {
    for (;;) {
      const jobs = await qmp.execute<BlockJob[]>('query-block-jobs', undefined, QMP_TIMEOUT_MS);
      let done = 0;
      let total = 0;
      let ready = true;
      for (const d of disks) {
        if (d.switched) {
          done += d.size;
          total += d.size;
          continue;
        }
        const job = jobs.find((j) => j.device === d.jobId);
        if (!job) throw new Error(`the mirror of the ${d.name} disk stopped before it was in step`);
        done += job.offset;
        total += job.len;
        ready &&= job.ready;
      }
      options.onProgress?.({ doneBytes: done, totalBytes: total, elapsedMs: Date.now() - started, ready });
      if (ready) return;
      if (options.signal?.aborted) throw new Error(`VM ${vmId}: the disk move was cancelled`);
      if (Date.now() - started > timeoutMs)
        throw new Error(`VM ${vmId}: the disks were not mirrored after ${timeoutMs} ms`);
      await sleep(POLL_MS, options.signal).catch(() => undefined);
    }
  }

  /** Switches each in-step drive to its copy and waits until QEMU shows every drive on it. */
  private async switchOver(qmp: QmpClient, vmId: string, disks: Disk[]): Promise<void> {
    for (const d of disks)
      if (!d.switched) await qmp.execute('block-job-complete', { device: d.jobId }, QMP_TIMEOUT_MS);
    const deadline = Date.now() + SWITCH_TIMEOUT_MS;
    for (;;) {
      // Jobs first: a job gone by then has made its switch, which the drives then show.
      const jobs = await qmp.execute<BlockJob[]>('query-block-jobs', undefined, QMP_TIMEOUT_MS);
      const blocks = await qmp.execute<BlockInfo[]>('query-block', undefined, QMP_TIMEOUT_MS);
      for (const d of disks)
        d.switched = blocks.some((b) => b.device === d.device && b.inserted?.file === d.target);
      const pending = disks.filter((d) => !d.switched);
      if (pending.length === 0) return;
      // A job gone without its drive on the copy failed at the switch.
      const failed = pending.filter((d) => !jobs.some((j) => j.device === d.jobId));
      if (failed.length > 0)
        throw new Error(`VM ${vmId}: the switch of the ${failed.map((d) => d.name).join(', ')} disk failed`);
      if (Date.now() > deadline)
        throw new Error(`VM ${vmId}: the drives did not switch within ${SWITCH_TIMEOUT_MS} ms`);
      await sleep(POLL_MS);
    }
  }

  /** After a failure: mirrors still running stop, and copies no drive uses go. */
  private async giveUp(qmp: QmpClient, disks: Disk[]): Promise<void> {
    for (const d of disks) {
      if (d.switched) continue;
      await qmp
        .execute('block-job-cancel', { device: d.jobId, force: true }, QMP_TIMEOUT_MS)
        .catch(() => undefined);
    }
    const blocks = await qmp
      .execute<BlockInfo[]>('query-block', undefined, QMP_TIMEOUT_MS)
      .catch(() => undefined);
    for (const d of disks)
      if (blocks && !blocks.some((b) => b.inserted?.file === d.target))
        await fs.rm(d.target, { force: true });
  }

  /** On the former storage host: the VM's folder goes, unless the VM runs or is stored here. */
  async dropMovedDisks(handle: VmHandle): Promise<void> {
    const vmId = handle.vmId;
    if (handle.storageHost === this.ctx.hostName)
      throw new Error(`VM ${vmId}: its disks are recorded on ${this.ctx.hostName}; they are not dropped`);
    const saved = await this.ctx.store.readState<QemuVmState>(vmId);
    if (!saved) return;
    const paths = this.ctx.store.paths(vmId);
    const pid = Number(saved.handle.state.pid) || (await readPidFile(pidFileOf(paths)));
    if (saved.handle.host === this.ctx.hostName || (await isVmProcess(pid, paths.qmpSocket)))
      throw new Error(`VM ${vmId} runs on ${this.ctx.hostName}: its disks here are in use`);
    await this.ctx.store.remove(vmId);
    this.log.info({ vmId, now: handle.storageHost }, 'moved disks dropped');
  }
}
