import path from 'node:path';
import { HOST_NAME } from '../config/names';
import type { VmDiskRef } from '../drivers/types';
import { nfsUrl, validateEndpoint, type NfsEndpoint } from './nfsExport';

/**
 * A VM disk named independently of where the VM runs: the host whose store holds it, and its path inside
 * that store. Disks stay where they were made; a VM that moves reaches them over NFS.
 */
export type DiskLocator = VmDiskRef;

/** Each host's export, from the cluster configuration. */
export type ClusterStorage = Record<string, NfsEndpoint>;

/** Where QEMU opens a disk: a local file, or the storage host's export over NFSv3 (libnfs). */
export type QemuDiskSource =
  { kind: 'file'; filename: string } | { kind: 'nfs'; url: string; server: string; path: string };

const SEGMENT = /^[A-Za-z0-9_.-]+$/;

export function validateLocator(loc: DiskLocator): void {
  const segments = loc.path.split('/');
  if (!loc.storageHost) throw new Error(`disk locator ${JSON.stringify(loc)} names no storage host`);
  if (segments.some((s) => !SEGMENT.test(s) || s === '.' || s === '..'))
    throw new Error(
      `disk locator path ${JSON.stringify(loc.path)} must be relative, without '..' or empty parts`,
    );
}

/** The locator of a file inside `storeRoot` of `storageHost`; throws for files outside the store. */
export function locatorOf(storageHost: string, storeRoot: string, file: string): DiskLocator {
  const rel = path.relative(storeRoot, file);
  if (!rel || rel.startsWith('..') || path.isAbsolute(rel))
    throw new Error(`${file} is not inside the store ${storeRoot} of host ${storageHost}`);
  const loc = { storageHost, path: rel.split(path.sep).join('/') };
  validateLocator(loc);
  return loc;
}

/**
 * Resolves a locator for QEMU running on `localHost`: the file itself on the storage host, its NFS URL
 * anywhere else. Throws when the cluster configuration has no export for the storage host.
 */
export function resolveForQemu(
  loc: DiskLocator,
  local: { host: string; storeRoot: string; cluster: ClusterStorage },
): QemuDiskSource {
  validateLocator(loc);
  if (loc.storageHost === local.host) return { kind: 'file', filename: path.join(local.storeRoot, loc.path) };
  const endpoint = local.cluster[loc.storageHost];
  if (!endpoint)
    throw new Error(
      `no NFS export configured for storage host ${loc.storageHost} (known: ${Object.keys(local.cluster).join(', ') || 'none'})`,
    );
  validateEndpoint(endpoint, loc.storageHost);
  return {
    kind: 'nfs',
    url: nfsUrl(endpoint, loc.path),
    server: endpoint.address,
    path: `${endpoint.exportPath}/${loc.path}`,
  };
}

/** The protocol node of a `-blockdev` / QMP blockdev-add for the source. */
export function qemuFileNode(src: QemuDiskSource): Record<string, unknown> {
  return src.kind === 'file'
    ? { driver: 'file', filename: src.filename }
    : { driver: 'nfs', server: { type: 'inet', host: src.server }, path: src.path };
}

/** The `file=` value of a `-drive` option (QEMU parses nfs:// URLs itself). */
export function qemuFileName(src: QemuDiskSource): string {
  return src.kind === 'file' ? src.filename : src.url;
}

/**
 * Where a locator's disk is under the per-host NFS mounts of a production cluster
 * (deploy/production/storagePlan.ts): `<mountRoot>/<storageHost>/<path>`. Every host mounts every other
 * host's store there and binds its own store at its own name, so the path is the same on every host and a
 * domain config that names it (Xen's `xl migrate` sends the config along) is valid wherever the VM moves.
 */
export function resolveUnderMounts(loc: DiskLocator, mountRoot: string): string {
  validateLocator(loc);
  if (!HOST_NAME.test(loc.storageHost))
    throw new Error(`disk locator storage host ${JSON.stringify(loc.storageHost)} is not a host name`);
  validateMountRoot(mountRoot);
  return path.posix.join(mountRoot, loc.storageHost, loc.path);
}

/** A mount root is a normalised absolute folder (no trailing slash, no `..`), and not `/` itself. */
export function validateMountRoot(mountRoot: string): void {
  if (!path.isAbsolute(mountRoot) || path.posix.normalize(mountRoot) !== mountRoot || mountRoot.endsWith('/'))
    throw new Error(
      `mount root ${JSON.stringify(mountRoot)} must be a normalised absolute folder like /var/lib/vsp/cluster`,
    );
}
