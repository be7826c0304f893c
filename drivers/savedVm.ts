import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { VmStore } from '../storage/vmStore';
import type { MigrationSource, VmConfig, VmDiskRef, VmHandle } from './types';

/** What a VM driver's state file in the VM folder holds: enough to re-attach from any worker. */
export interface SavedVm {
  config: VmConfig;
  handle: VmHandle;
}

/** The saved VM; throws when this host's store has none. */
export async function readSavedVm(store: VmStore, vmId: string, hostName: string): Promise<SavedVm> {
  const saved = await store.readState<SavedVm>(vmId);
  if (!saved) throw new Error(`VM ${vmId} does not exist on ${hostName}`);
  return saved;
}

/** The host a VM left `hostName` for by live migration (undefined: it did not leave). */
export async function hostVmLeftFor(
  store: VmStore,
  vmId: string,
  hostName: string,
): Promise<string | undefined> {
  const saved = await store.readState<SavedVm>(vmId);
  if (!saved) return 'another host';
  return saved.handle.host !== hostName ? saved.handle.host : undefined;
}

/** Created by the one `start` that boots the VM (and by a finished incoming migration). */
export function startedMarkerOf(vmDir: string): string {
  return path.join(vmDir, 'started');
}

/** The handle of a VM that starts now on `host`: its time limit counts from now. */
export function startingHandle(
  current: VmHandle,
  host: string,
  config: VmConfig,
  state: VmHandle['state'],
): VmHandle {
  const startedAt = Date.now();
  return {
    ...current,
    host,
    state: { ...current.state, ...state, startedAt, deadline: startedAt + config.timeLimitSec * 1000 },
  };
}

/** Creates the start marker; false when it already exists (the VM was started: never start it twice). */
export async function claimStart(vmDir: string): Promise<boolean> {
  try {
    await (await fs.open(startedMarkerOf(vmDir), 'wx')).close();
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw err;
  }
}

export function wasStarted(vmDir: string): Promise<boolean> {
  return fs.access(startedMarkerOf(vmDir)).then(
    () => true,
    () => false,
  );
}

/** The disk locators a handle carries (state diskRoot/diskData/diskBase), or undefined when it has none. */
export function diskRefsOf(handle: VmHandle): MigrationSource['disks'] | undefined {
  const ref = (p: unknown): VmDiskRef | undefined =>
    typeof p === 'string' && p ? { storageHost: handle.storageHost, path: p } : undefined;
  const root = ref(handle.state.diskRoot);
  const data = ref(handle.state.diskData);
  return root && data ? { root, data, base: ref(handle.state.diskBase) } : undefined;
}
