import { promises as fs } from 'node:fs';
import path from 'node:path';
import { stagingImageOf, unmountStagingImage } from './stagingMount';
import { writeFileAtomic } from './durableFile';

/**
 * A host's local VM store. Each VM folder is self-contained (disks, logs, control socket, state),
 * because the migration issue exports these folders to the other hosts over NFS.
 *
 *   <root>/images/<sha256>.<fmt>     base-image cache, keyed by content hash
 *   <root>/vms/<vmId>/               one VM (see VmPaths)
 */
export interface VmPaths {
  dir: string;
  /** Inputs streamed from the repository land here before staging. */
  inputsDir: string;
  /** The task's home, for drivers that stage into a folder. */
  homeDir: string;
  /** The task's home, for drivers that stage into an ext4 disk image. */
  dataDisk: string;
  rootDisk: string;
  stateFile: string;
  /** Task stdout+stderr (process driver writes it directly; VMs have it on the data disk). */
  taskLog: string;
  consoleLog: string;
  /** Private folder of the VM's QEMU (owned by its unprivileged account): where it makes its QMP socket. */
  runDir: string;
  qmpSocket: string;
  exitFile: string;
  /** Outputs extracted at stage-out, before upload. */
  outboxDir: string;
}

const VM_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

export class VmStore {
  constructor(readonly root: string) {}

  get imagesDir(): string {
    return path.join(this.root, 'images');
  }

  get vmsDir(): string {
    return path.join(this.root, 'vms');
  }

  paths(vmId: string): VmPaths {
    if (!VM_ID.test(vmId)) throw new Error(`invalid VM id ${JSON.stringify(vmId)}`);
    const dir = path.join(this.vmsDir, vmId);
    return {
      dir,
      inputsDir: path.join(dir, 'inputs'),
      homeDir: path.join(dir, 'home'),
      dataDisk: path.join(dir, 'data.img'),
      rootDisk: path.join(dir, 'root.qcow2'),
      stateFile: path.join(dir, 'state.json'),
      taskLog: path.join(dir, 'task.log'),
      consoleLog: path.join(dir, 'console.log'),
      runDir: path.join(dir, 'run'),
      qmpSocket: path.join(dir, 'run', 'qmp.sock'),
      exitFile: path.join(dir, 'exit-status'),
      outboxDir: path.join(dir, 'outbox'),
    };
  }

  async init(): Promise<void> {
    await fs.mkdir(this.imagesDir, { recursive: true });
    await fs.mkdir(this.vmsDir, { recursive: true });
  }

  async list(): Promise<string[]> {
    try {
      return (await fs.readdir(this.vmsDir)).filter((n) => VM_ID.test(n));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
  }

  async readState<T>(vmId: string): Promise<T | undefined> {
    try {
      return JSON.parse(await fs.readFile(this.paths(vmId).stateFile, 'utf8')) as T;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  /** Atomic: a reader never sees half a state file. */
  async writeState(vmId: string, state: unknown): Promise<void> {
    const p = this.paths(vmId);
    await fs.mkdir(p.dir, { recursive: true });
    await writeFileAtomic(p.stateFile, JSON.stringify(state, null, 2));
  }

  async remove(vmId: string): Promise<void> {
    const p = this.paths(vmId);
    // A stage-in cut short may have left the data disk mounted on the inputs folder.
    await unmountStagingImage(stagingImageOf(p.dataDisk), p.inputsDir);
    await fs.rm(p.dir, { recursive: true, force: true });
  }
}
