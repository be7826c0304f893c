import path from 'node:path';
import { z } from 'zod';
import { HOST_NAME } from '../../config/names';
import { validateMountRoot } from '../../storage/diskLocator';

/**
 * Kernel NFS storage of a production cluster, computed for one host from the cluster configuration:
 * the host exports its VM store to the other hosts (an /etc/exports block) and mounts every other host's
 * store at `<mountRoot>/<host>`, with its own store bound at `<mountRoot>/<self>`, so a disk path
 * (storage/diskLocator.ts `resolveUnderMounts`) is the same on every host. Pure: applyStorage.ts writes it.
 */

/** First line of every file this plan writes: how apply recognises (and removes) its own stale units. */
export const GENERATED_MARKER =
  '# Written by VSP (deploy/production/applyStorage.js): rerun it instead of editing.';
export const EXPORTS_BEGIN =
  '# BEGIN VSP cluster storage (deploy/production/applyStorage.js rewrites this block)';
export const EXPORTS_END = '# END VSP cluster storage';
export const SYSTEMD_UNIT_DIR = '/etc/systemd/system';

export const DEFAULT_MOUNT_ROOT = '/var/lib/vsp/cluster';
export const DEFAULT_STORE_DIR = '/var/lib/vsp/store';

/** Paths written into exports and unit files: no spaces, quotes or escapes to get wrong. */
const SAFE_PATH = /^\/[A-Za-z0-9_.\-/]*$/;
const safeDir = (what: string) =>
  z
    .string()
    .regex(SAFE_PATH, `${what} must be an absolute path of letters, digits, _ . - and /`)
    .refine((p) => path.posix.normalize(p) === p && (p === '/' || !p.endsWith('/')), {
      message: `${what} must be normalised (no trailing /, // or ..)`,
    });

const accountId = (what: string) =>
  z
    .number({ error: `${what} is the account's number, the same on every host` })
    .int(`${what} is a whole number`)
    .min(1, `${what} must not be root's (0)`)
    .max(2 ** 31 - 2, `${what} is too large`);

/**
 * The unprivileged account QEMU runs as (VSP_QEMU_USER), with the same uid and gid on every host: NFS
 * carries numbers, and the disks of a VM are that account's on its storage host (deploy/setup.sh creates
 * it with VSP_QEMU_UID/VSP_QEMU_GID).
 */
const QemuAccountSchema = z.object(
  {
    user: z
      .string()
      .regex(/^[a-z_][a-z0-9_-]{0,31}$/, 'qemuAccount.user is a user name like vsp-qemu')
      .default('vsp-qemu'),
    uid: accountId('qemuAccount.uid'),
    gid: accountId('qemuAccount.gid'),
  },
  {
    error: (iss) =>
      iss.code === 'invalid_type'
        ? 'qemuAccount is required: {"user": "vsp-qemu", "uid": N, "gid": N}, the same on every host'
        : undefined,
  },
);

/**
 * The cluster file: `clusterStorage` is VSP_CLUSTER_STORAGE's format (config/workerConfig.ts), `storeDir`
 * the host worker's VSP_STORE_DIR; unknown keys are allowed, so one file can also be a worker's VSP_CONFIG.
 */
export const ClusterStorageConfigSchema = z.object({
  mountRoot: safeDir('mountRoot').default(DEFAULT_MOUNT_ROOT),
  storeDir: safeDir('storeDir').default(DEFAULT_STORE_DIR),
  /** NFS version of the mounts; the exports serve both (QEMU's libnfs speaks v3). */
  nfsVersion: z.enum(['3', '4.1', '4.2']).default('4.2'),
  qemuAccount: QemuAccountSchema,
  clusterStorage: z.record(
    // Host names are checked after parsing: zod reports a bad record key without its own message.
    z.string(),
    z.object({
      address: z.ipv4('the export address must be an IPv4 address'),
      exportPath: z
        .string()
        .regex(/^\/[A-Za-z0-9_.-]+$/, 'the export path is one absolute component like /vsp'),
    }),
    {
      error: (iss) =>
        iss.code === 'invalid_type' ? 'a JSON object of host -> {address, exportPath}' : undefined,
    },
  ),
});

export type ClusterStorageConfig = z.output<typeof ClusterStorageConfigSchema>;

/** Validates a parsed cluster file; the error names every bad field and every inconsistency. */
export function parseClusterStorageConfig(
  input: unknown,
  source = 'cluster configuration',
): ClusterStorageConfig {
  const r = ClusterStorageConfigSchema.safeParse(input);
  if (!r.success)
    throw new Error(
      `invalid ${source}: ${r.error.issues.map((i) => `${i.path.join('.') || '(top)'}: ${i.message}`).join('; ')}`,
    );
  const c = r.data;
  validateMountRoot(c.mountRoot);
  const bad: string[] = [];
  const hosts = Object.keys(c.clusterStorage);
  if (hosts.length === 0) bad.push('clusterStorage lists no host');
  const byAddress = new Map<string, string>();
  for (const [host, e] of Object.entries(c.clusterStorage)) {
    if (!HOST_NAME.test(host))
      bad.push(`clusterStorage.${host}: host names are lower-case letters, digits and -`);
    const other = byAddress.get(e.address);
    if (other) bad.push(`hosts ${other} and ${host} have the same address ${e.address}`);
    byAddress.set(e.address, host);
    if (within(e.exportPath, c.mountRoot) || within(c.mountRoot, e.exportPath))
      bad.push(`export path ${e.exportPath} of ${host} overlaps mountRoot ${c.mountRoot}`);
  }
  // The mounts must not be reachable through the store (an export would then loop back into itself).
  if (within(c.storeDir, c.mountRoot) || within(c.mountRoot, c.storeDir))
    bad.push(`storeDir ${c.storeDir} and mountRoot ${c.mountRoot} must not contain each other`);
  if (bad.length > 0) throw new Error(`invalid ${source}: ${bad.join('; ')}`);
  return c;
}

/** `inner` is `outer` or lies below it. */
function within(inner: string, outer: string): boolean {
  const rel = path.posix.relative(outer, inner);
  return rel === '' || (!rel.startsWith('..') && !path.posix.isAbsolute(rel));
}

/** A mount as it will be on the host: enough to check that every host sees the same disk paths. */
export interface PlannedMount {
  where: string;
  /** A local folder (bind) or `address:/export` (NFS). */
  what: string;
  type: 'bind' | 'nfs';
  /** Host whose store this mount shows (undefined: the export's own bind of the store). */
  storeOf?: string;
}

export interface PlannedUnit {
  /** Unit file name, e.g. `var-lib-vsp-cluster-b.mount`. */
  name: string;
  content: string;
  /** Enabled and started by apply; a remote mount's .mount unit is only pulled in by its .automount. */
  enable: boolean;
  /** Activation order: 0 local binds (before the export), 1 remote automounts (after it). */
  stage: 0 | 1;
}

export interface StoragePlan {
  host: string;
  mountRoot: string;
  storeDir: string;
  /**
   * The store folder's owner and mode: root's, readable and searchable by QEMU's account (whose are the VM
   * disks inside), so that account can neither replace the base-image cache nor touch other folders.
   */
  storeOwner: { uid: number; gid: number; mode: number };
  /** The /etc/exports block, markers included. */
  exportsBlock: string;
  units: PlannedUnit[];
  mounts: PlannedMount[];
  /** Folders that must exist before the units start (mount points and the store). */
  directories: string[];
}

/**
 * Options of the NFS mounts, chosen for VM disks: `hard` (I/O waits out a server outage instead of
 * failing, so a guest never sees a disk error that would make it remount read-only or corrupt it),
 * timeo=600/retrans=2 (the TCP defaults: 60 s before a retry, no early retransmission storm on a busy
 * server), TCP only, noatime (no metadata writes for reads of base images).
 */
export function nfsMountOptions(nfsVersion: ClusterStorageConfig['nfsVersion']): string {
  return [`nfsvers=${nfsVersion}`, 'proto=tcp', 'hard', 'timeo=600', 'retrans=2', 'noatime'].join(',');
}

/**
 * Export options: rw; sync (the server commits a write before acknowledging it, so a guest's flush is
 * durable even if the storage host crashes); no_subtree_check (the store is a whole folder, and subtree
 * checks break file handles of files renamed while open, as atomic state writes do); secure (requests from
 * reserved ports only, i.e. from the peers' kernels, not from their unprivileged processes); root_squash
 * with anonuid/anongid of QEMU's account: root on a peer (Xen's qdisk backend, the worker) is never root
 * here, only the account that owns the VM disks, and QEMU itself runs as that account. Each peer host is
 * listed by its own address, never a subnet or `*`.
 */
export function exportOptions(account: ClusterStorageConfig['qemuAccount']): string {
  return [
    'rw',
    'sync',
    'no_subtree_check',
    'secure',
    'root_squash',
    `anonuid=${account.uid}`,
    `anongid=${account.gid}`,
    'sec=sys',
  ].join(',');
}

export function planHostStorage(config: ClusterStorageConfig, host: string): StoragePlan {
  const self = config.clusterStorage[host];
  if (!self)
    throw new Error(
      `host ${JSON.stringify(host)} is not in clusterStorage (hosts: ${Object.keys(config.clusterStorage).join(', ')})`,
    );
  const others = Object.entries(config.clusterStorage)
    .filter(([h]) => h !== host)
    .sort(([a], [b]) => a.localeCompare(b));
  const { mountRoot, storeDir } = config;
  const units: PlannedUnit[] = [];
  const mounts: PlannedMount[] = [];

  // The export's path is the one in VSP_CLUSTER_STORAGE (nfs:// URLs of the QEMU driver use it too).
  if (self.exportPath !== storeDir) {
    units.push(bindUnit(storeDir, self.exportPath, `VM store of ${host}, at its NFS export path`, true));
    mounts.push({ where: self.exportPath, what: storeDir, type: 'bind' });
  }
  units.push(bindUnit(storeDir, hostMountPoint(mountRoot, host), `VM store of ${host} (this host)`, false));
  mounts.push({ where: hostMountPoint(mountRoot, host), what: storeDir, type: 'bind', storeOf: host });

  for (const [other, e] of others) {
    const where = hostMountPoint(mountRoot, other);
    const what = `${e.address}:${e.exportPath}`;
    const base = systemdEscapePath(where);
    units.push(
      {
        name: `${base}.mount`,
        content: unitFile([
          [
            'Unit',
            [
              `Description=VSP: VM store of host ${other} (${what})`,
              'Wants=network-online.target',
              'After=network-online.target',
            ],
          ],
          [
            'Mount',
            [
              `What=${what}`,
              `Where=${where}`,
              'Type=nfs',
              `Options=${nfsMountOptions(config.nfsVersion)}`,
              'TimeoutSec=60',
            ],
          ],
        ]),
        enable: false,
        stage: 1,
      },
      {
        // Mounted on first use: a host that is down at boot delays nothing and is mounted once it answers.
        name: `${base}.automount`,
        content: unitFile([
          ['Unit', [`Description=VSP: VM store of host ${other}, mounted on first use`]],
          ['Automount', [`Where=${where}`]],
          ['Install', ['WantedBy=remote-fs.target']],
        ]),
        enable: true,
        stage: 1,
      },
    );
    mounts.push({ where, what, type: 'nfs', storeOf: other });
  }

  const options = exportOptions(config.qemuAccount);
  const clients = others.map(([, e]) => `${e.address}(${options})`);
  const exportsBlock = [
    EXPORTS_BEGIN,
    // An exports line without clients would export to everyone: a one-host cluster exports nothing.
    clients.length > 0
      ? `${self.exportPath} ${clients.join(' ')}`
      : `# ${host} is the only host: nothing to export`,
    EXPORTS_END,
  ].join('\n');

  return {
    host,
    mountRoot,
    storeDir,
    storeOwner: { uid: 0, gid: config.qemuAccount.gid, mode: 0o750 },
    exportsBlock,
    units,
    mounts,
    directories: [storeDir, ...mounts.map((m) => m.where)],
  };
}

export function hostMountPoint(mountRoot: string, host: string): string {
  return path.posix.join(mountRoot, host);
}

function bindUnit(what: string, where: string, description: string, forExport: boolean): PlannedUnit {
  return {
    name: `${systemdEscapePath(where)}.mount`,
    content: unitFile([
      [
        'Unit',
        [
          `Description=VSP: ${description}`,
          `RequiresMountsFor=${what}`,
          ...(forExport ? ['Before=nfs-server.service'] : []),
        ],
      ],
      ['Mount', [`What=${what}`, `Where=${where}`, 'Type=none', 'Options=bind']],
      ['Install', ['WantedBy=local-fs.target']],
    ]),
    enable: true,
    stage: 0,
  };
}

function unitFile(sections: [string, string[]][]): string {
  return [
    GENERATED_MARKER,
    ...sections.map(([name, lines]) => [`[${name}]`, ...lines].join('\n') + '\n'),
  ].join('\n');
}

/**
 * `systemd-escape --path`: systemd names a mount unit after its mount point. The path is simplified,
 * its slashes become `-`, and every byte other than ASCII letters, digits, `:`, `_` and a non-leading `.`
 * becomes `\xNN` (so `-` in a host name is `\x2d`).
 */
export function systemdEscapePath(p: string): string {
  const simplified = p
    .split('/')
    .filter((s) => s !== '' && s !== '.')
    .join('/');
  if (simplified === '') return '-';
  let out = '';
  const bytes = Buffer.from(simplified, 'utf8');
  for (let i = 0; i < bytes.length; i++) {
    const ch = String.fromCharCode(bytes[i]);
    if (ch === '/') out += '-';
    else if (/[A-Za-z0-9:_]/.test(ch) || (ch === '.' && i > 0)) out += ch;
    else out += `\\x${bytes[i].toString(16).padStart(2, '0')}`;
  }
  return out;
}
