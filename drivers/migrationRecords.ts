import { promises as fs } from 'node:fs';
import path from 'node:path';
import { writeFileAtomic } from '../storage/durableFile';
import type { VmStore } from '../storage/vmStore';
import { readSavedVm, type SavedVm } from './savedVm';
import type { IncomingVm, MigrationSource } from './types';

/** What a target host records in the VM folder (`incoming.json`) while it receives a VM. */
export interface IncomingRecord {
  source: MigrationSource;
  incoming: IncomingVm;
}

/**
 * What the migration classes (QEMU, Xen) keep in a VM folder of this host's store: the saved VM, and on a
 * target the incoming record.
 */
export abstract class MigrationRecords {
  constructor(private readonly where: { store: VmStore; hostName: string }) {}

  protected incomingFile(vmId: string): string {
    return path.join(this.where.store.paths(vmId).dir, 'incoming.json');
  }

  /** The incoming record, or undefined when no VM is being received. */
  protected async readIncoming(vmId: string): Promise<IncomingRecord | undefined> {
    try {
      return JSON.parse(await fs.readFile(this.incomingFile(vmId), 'utf8')) as IncomingRecord;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  protected async writeIncoming(vmId: string, record: IncomingRecord): Promise<void> {
    await writeFileAtomic(this.incomingFile(vmId), JSON.stringify(record, null, 2));
  }

  protected readState(vmId: string): Promise<SavedVm> {
    return readSavedVm(this.where.store, vmId, this.where.hostName);
  }
}
