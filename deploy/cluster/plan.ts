import path from 'node:path';
import { hostTaskQueue } from '../../config/names';
import { replaceMarkedBlock } from '../production/markedBlock';
import { hostMountPoint } from '../production/storagePlan';
import { clusterStorageOf, type DeployInventory, type InventoryHost } from './inventory';

/**
 * What `vsp cluster deploy` does on each host, as data: the steps in order, the files it writes with their
 * content, and the decisions that make a second deploy change nothing (a file is written only when its
 * content or mode differs, the release is sent only when the host lacks its hash, the worker restarts
 * only when something it reads changed). Pure: hostSteps.ts carries it out over SSH.
 */

/** Where releases live on a host; `/opt/vsp` (the units' path) links to the current one. */
export const RELEASES_DIR = '/opt/vsp-releases';
export const INSTALL_LINK = '/opt/vsp';
/** Written into a release folder last: a folder without it is an interrupted copy. */
export const RELEASE_MARKER = '.vsp-release';
export const CLUSTER_FILE = '/etc/vsp/cluster.json';
export const HOST_WORKER_ENV = '/etc/vsp/host-worker.env';
export const HOST_WORKER_UNIT = 'vsp-host-worker.service';
export const KNOWN_HOSTS_FILE = '/etc/ssh/ssh_known_hosts';
export const KNOWN_HOSTS_BEGIN = '# BEGIN VSP cluster hosts (vsp cluster deploy rewrites this block)';
export const KNOWN_HOSTS_END = '# END VSP cluster hosts';
const GENERATED = '# Written by vsp cluster deploy from the inventory: rerun the deploy instead of editing.';

export const STEP_NAMES = [
  'connect',
  'preflight',
  'release',
  'account',
  'config',
  'storage',
  'appliance',
  'service',
  'check',
] as const;
export type StepName = (typeof STEP_NAMES)[number];

/** A file the deploy owns on a host, whole or (`block`) between marker lines. */
export interface DesiredFile {
  path: string;
  mode: number;
  /** The whole content, or the block that replaces the marked block of an existing file. */
  content: string;
  block?: { begin: string; end: string };
  /** The worker reads it: a change restarts the worker. */
  restartsWorker: boolean;
  /** Holds a secret: never printed. */
  secret?: boolean;
  /** The project file it is a copy of (the plan prints that instead of the content). */
  source?: string;
}

export interface HostPlan {
  host: InventoryHost;
  files: DesiredFile[];
  /** `setup-storage.sh` arguments on the host. */
  storageCommand: string[];
  /** Other hosts whose export this host mounts, with the mount point and the NFS source. */
  peerMounts: { host: string; where: string; source: string }[];
  taskQueue: string;
  steps: { name: StepName; summary: string }[];
}

/** The content of one host's files and the steps, for a deploy or a `--dry-run`. */
export function planHost(
  inv: DeployInventory,
  host: InventoryHost,
  repositoryToken: string,
  unitFile: string,
): HostPlan {
  const c = inv.cluster;
  const storage = clusterStorageOf(inv, host);
  const clusterJson = `${JSON.stringify(storage, null, 2)}\n`;
  const env: [string, string][] = [
    ['VSP_HOST', host.name],
    ['VSP_CONFIG', CLUSTER_FILE],
    ['VSP_REPOSITORY_URL', c.repositoryUrl],
    ['VSP_REPOSITORY_TOKEN', repositoryToken],
    ['VSP_DRIVERS', c.driver],
    ['VSP_APPLIANCE_DIR', c.applianceDir],
    ['VSP_QEMU_USER', c.qemuAccount.user],
    // QEMU hosts open other hosts' disks through the kernel NFS mounts (README section 2).
    ...(c.driver === 'qemu' ? ([['VSP_QEMU_REMOTE_DISKS', 'mounts']] as [string, string][]) : []),
    ...(c.driver === 'xen' && c.xenGuestCpus
      ? ([['VSP_XEN_GUEST_CPUS', c.xenGuestCpus]] as [string, string][])
      : []),
    ['TEMPORAL_ADDRESS', c.temporalAddress],
    ['TEMPORAL_NAMESPACE', c.temporalNamespace],
    ['LOG_LEVEL', c.logLevel],
  ];
  const envText = [GENERATED, ...env.map(([k, v]) => `${k}=${envValue(k, v)}`)].join('\n') + '\n';
  const knownHosts = [
    KNOWN_HOSTS_BEGIN,
    ...inv.hosts.map((h) => `${h.name},${h.address} ${keyWithoutComment(h.hostKey)}`),
    KNOWN_HOSTS_END,
  ].join('\n');
  const files: DesiredFile[] = [
    { path: CLUSTER_FILE, mode: 0o644, content: clusterJson, restartsWorker: true },
    { path: HOST_WORKER_ENV, mode: 0o600, content: envText, restartsWorker: true, secret: true },
    {
      path: path.posix.join('/etc/systemd/system', HOST_WORKER_UNIT),
      mode: 0o644,
      content: unitFile,
      restartsWorker: true,
      source: `deploy/production/systemd/${HOST_WORKER_UNIT}`,
    },
    // xl migrate runs ssh to the other hosts as root with BatchMode: their keys must be known.
    {
      path: KNOWN_HOSTS_FILE,
      mode: 0o644,
      content: knownHosts,
      block: { begin: KNOWN_HOSTS_BEGIN, end: KNOWN_HOSTS_END },
      restartsWorker: false,
    },
  ];
  const peerMounts = inv.hosts
    .filter((h) => h.name !== host.name)
    .map((h) => ({
      host: h.name,
      where: hostMountPoint(storage.mountRoot, h.name),
      source: `${h.address}:${h.exportPath ?? c.exportPath}`,
    }));
  const storageCommand = [
    `${INSTALL_LINK}/deploy/production/setup-storage.sh`,
    '--host',
    host.name,
    '--config',
    CLUSTER_FILE,
  ];
  const steps: HostPlan['steps'] = [
    {
      name: 'connect',
      summary: `ssh ${inv.ssh.user}@${host.address}:${inv.ssh.port}, host key ${keyType(host.hostKey)} as in the inventory`,
    },
    {
      name: 'preflight',
      summary: `root, node of this machine's major version and architecture, systemctl, exportfs, mount.nfs${c.driver === 'xen' ? ', xl' : ''}`,
    },
    {
      name: 'release',
      summary: `send the release unless ${RELEASES_DIR}/<sha256> exists; ${INSTALL_LINK} -> it`,
    },
    {
      name: 'account',
      summary: `QEMU's account ${c.qemuAccount.user} with uid ${c.qemuAccount.uid}, gid ${c.qemuAccount.gid}`,
    },
    { name: 'config', summary: `write ${files.map((f) => f.path).join(', ')} where they differ` },
    { name: 'storage', summary: storageCommand.join(' ') },
    {
      name: 'appliance',
      summary: `${INSTALL_LINK}/deploy/guest/build-appliance.sh ${c.applianceDir} (cached by its inputs)`,
    },
    {
      name: 'service',
      summary: `enable ${HOST_WORKER_UNIT}; restart it if the release or its configuration changed`,
    },
    {
      name: 'check',
      summary: [
        ...(c.driver === 'xen' ? ['xl info'] : []),
        ...peerMounts.map((m) => `${m.where} mounted from ${m.source}`),
        `a poller of task queue ${hostTaskQueue(host.name)} from this worker`,
      ].join('; '),
    },
  ];
  return { host, files, storageCommand, peerMounts, taskQueue: hostTaskQueue(host.name), steps };
}

/** systemd EnvironmentFile values: one line; quoted when they hold characters systemd would interpret. */
function envValue(key: string, value: string): string {
  if (/[\n\r]/.test(value)) throw new Error(`${key} must be one line`);
  return /^[A-Za-z0-9_@%+=:,./-]*$/.test(value) ? value : `"${value.replace(/(["\\$`])/g, '\\$1')}"`;
}

function keyWithoutComment(line: string): string {
  return line.trim().split(/\s+/).slice(0, 2).join(' ');
}

function keyType(line: string): string {
  return line.trim().split(/\s+/)[0];
}

export type FileAction = 'create' | 'update' | 'unchanged';

/**
 * What writing `file` changes on a host that has `current` (undefined: no file) with `currentMode`;
 * `content` is the full text to write (the marked block merged into the rest of the file).
 */
export function fileChange(
  file: DesiredFile,
  current: string | undefined,
  currentMode: number | undefined,
): { action: FileAction; content: string } {
  const content = file.block
    ? replaceMarkedBlock(current ?? '', file.content, file.block.begin, file.block.end)
    : file.content;
  if (current === undefined) return { action: 'create', content };
  return { action: current === content && currentMode === file.mode ? 'unchanged' : 'update', content };
}

/** Lines of setup-storage.sh's report that say it changed a file. */
export function storageChanges(report: string): string[] {
  return report
    .split('\n')
    .filter((l) => /^(created|updated|removed)\s/.test(l))
    .map((l) => l.replace(/\s+/g, ' ').trim());
}

/** Whether the worker must (re)start: it is not running, or what it runs or reads changed. */
export function serviceAction(
  active: boolean,
  changed: { release: boolean; workerFiles: boolean },
): 'start' | 'restart' | 'none' {
  if (!active) return 'start';
  return changed.release || changed.workerFiles ? 'restart' : 'none';
}

/** A worker's poller identity (workers/hostWorker.ts): `vsp-host-<name>@<pid>.<random>`. */
export function workerIdentityPrefix(host: string, mainPid: number): string {
  return `vsp-host-${host}@${mainPid}.`;
}

/**
 * The releases to delete: all but the current one and the newest other one (a quick way back), so a
 * deploy that changes nothing deletes nothing. `newestFirst` is the folder listing by time (`ls -t`).
 */
export function staleReleases(newestFirst: string[], current: string): string[] {
  const releases = newestFirst.filter((r) => /^[0-9a-f]{64}$/.test(r));
  const previous = releases.find((r) => r !== current);
  return releases.filter((r) => r !== current && r !== previous);
}
