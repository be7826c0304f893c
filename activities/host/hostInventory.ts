import { promises as fs } from 'node:fs';
import os from 'node:os';
import type { HostInventory } from '../../scheduler/model';
import { MiB } from '../../scheduler/model';
import type { ImageNames } from '../../storage/imageNames';

export interface InventorySource {
  host: string;
  storeDir: string;
  drivers: string[];
  defaultDriver?: string;
  accelerator?: string;
  /** Configured sizes (a host shared with other work offers less than the machine has). */
  vcpus?: number;
  memoryMiB?: number;
  labels: Record<string, string>;
  images: ImageNames;
}

/**
 * What this host offers now: its configured or physical size, its store's free space, its drivers,
 * the base images in its cache. Cheap enough for every heartbeat (one statfs, one folder listing).
 */
export function createInventory(src: InventorySource): () => Promise<HostInventory> {
  const workerStartedAt = new Date().toISOString();
  return async () => {
    const [fsStat, cachedImages] = await Promise.all([fs.statfs(src.storeDir), src.images.cached()]);
    return {
      host: src.host,
      vcpus: src.vcpus ?? os.cpus().length,
      memoryMiB: src.memoryMiB ?? Math.floor(os.totalmem() / MiB),
      storeTotalBytes: fsStat.blocks * fsStat.bsize,
      storeFreeBytes: fsStat.bavail * fsStat.bsize,
      drivers: src.drivers,
      ...(src.defaultDriver ? { defaultDriver: src.defaultDriver } : {}),
      ...(src.accelerator ? { accelerator: src.accelerator } : {}),
      cachedImages,
      labels: src.labels,
      workerStartedAt,
      reportedAt: new Date().toISOString(),
    };
  };
}
