import { promises as fs } from 'node:fs';
import path from 'node:path';
import { inNetns } from '../deploy/devcluster/netns';
import { spawnManaged, type ManagedProcess } from '../deploy/devcluster/processes';
import { repoRoot } from '../deploy/devcluster/tools';
import { writeFileAtomic } from './durableFile';
import { runCommand } from '../lib/runCommand';
import { createLogger, describeError } from '../logging/logger';

/**
 * Each host serves its VM store to the other hosts over NFS. On the project's machines (no kernel NFS)
 * that is nfs-ganesha (FSAL VFS) with rpcbind, NFSv3, which QEMU's libnfs driver speaks; production
 * hosts use kernel NFS and only need the endpoint in the cluster configuration.
 */

/** Where a host's store is reachable: `nfs://<address><exportPath>/<path in store>`. */
export interface NfsEndpoint {
  address: string;
  /** The export's pseudo path, e.g. '/vsp' (NFSv3 mounts use it with Mount_Path_Pseudo). */
  exportPath: string;
}

export interface NfsExportOptions {
  hostName: string;
  /** The host's VM store root: the exported folder. */
  storeRoot: string;
  endpoint: NfsEndpoint;
  /** Config, log, pid file and NFSv4 recovery state of this export. */
  stateDir: string;
  /** Run inside this network namespace (test hosts). */
  netns?: string;
  /** Default 30 s. */
  readyTimeoutMs?: number;
}

export interface RunningNfsExport {
  hostName: string;
  endpoint: NfsEndpoint;
  process: ManagedProcess;
  stop(): Promise<void>;
}

const EXPORT_PATH = /^\/[A-Za-z0-9_.-]+$/;
const IPV4 = /^\d{1,3}(\.\d{1,3}){3}$/;
/** Characters that would end or break a quoted ganesha config value. */
const UNSAFE_IN_CONFIG = /["\\\n\r;{}]/;
const GANESHA_PLUGINS = '/usr/lib/x86_64-linux-gnu/ganesha';
const CHECK_TIMEOUT_MS = 10_000;

const log = createLogger('nfs-export');

export function validateEndpoint(e: NfsEndpoint, what: string): void {
  const bad: string[] = [];
  if (!IPV4.test(e.address)) bad.push(`address ${JSON.stringify(e.address)} is not an IPv4 address`);
  if (!EXPORT_PATH.test(e.exportPath))
    bad.push(`export path ${JSON.stringify(e.exportPath)} must be one absolute component like /vsp`);
  if (bad.length > 0) throw new Error(`invalid NFS endpoint of ${what}: ${bad.join('; ')}`);
}

export function nfsUrl(e: NfsEndpoint, pathInStore = ''): string {
  return `nfs://${e.address}${e.exportPath}/${pathInStore}`;
}

/** A ganesha config exporting `storeRoot` read-write over NFSv3/TCP on the endpoint's address only. */
export function renderGaneshaConfig(
  o: Pick<NfsExportOptions, 'storeRoot' | 'endpoint' | 'stateDir'>,
): string {
  validateEndpoint(o.endpoint, o.storeRoot);
  for (const [name, value] of [
    ['storeRoot', o.storeRoot],
    ['stateDir', o.stateDir],
  ]) {
    if (!path.isAbsolute(value) || UNSAFE_IN_CONFIG.test(value))
      throw new Error(`${name} ${JSON.stringify(value)} must be an absolute path without quotes or braces`);
  }
  return `# Written by VSP (storage/nfsExport.ts): the VM store of this host, for the other hosts.
NFS_CORE_PARAM {
    Bind_addr = ${o.endpoint.address};
    Protocols = 3;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    NFS_Port = 2049;
    MNT_Port = 20048;
    # NFSv3 MOUNT takes the pseudo path (nfs://host/vsp/...), as QEMU's libnfs driver sends it.
    Mount_Path_Pseudo = true;
    Plugins_Dir = "${GANESHA_PLUGINS}";
}
NFSv4 {
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = "${path.join(o.stateDir, 'recovery')}";
    Only_Numeric_Owners = true;
}
EXPORT {
    Export_Id = 1;
    Path = "${o.storeRoot}";
    Pseudo = "${o.endpoint.exportPath}";
    Protocols = 3;
    Transports = TCP;
    Access_Type = RW;
    # Root on a peer host is nobody here: QEMU opens remote disks as its own unprivileged account
    # (the same uid on every host), which owns the VM's disks in this store.
    Squash = Root_Squash;
    SecType = sys;
    FSAL { Name = VFS; }
}
LOG { Default_Log_Level = EVENT; }
`;
}

/**
 * Checks that a host's export answers (lists the export root with libnfs's nfs-ls); throws an error that
 * names the host and URL when it does not. `netns`: check from inside that namespace.
 */
export async function checkNfsExport(hostName: string, endpoint: NfsEndpoint, netns?: string): Promise<void> {
  const url = nfsUrl(endpoint);
  const c = netns ? inNetns(netns, 'nfs-ls', [url]) : { cmd: 'nfs-ls', args: [url] };
  try {
    await runCommand(c.cmd, c.args, { timeoutMs: CHECK_TIMEOUT_MS });
  } catch (err) {
    throw new Error(`the NFS export of host ${hostName} (${url}) is unreachable`, { cause: err });
  }
}

/** Writes the config, starts rpcbind + ganesha and resolves once the export answers. */
export async function startNfsExport(o: NfsExportOptions): Promise<RunningNfsExport> {
  await fs.mkdir(path.join(o.stateDir, 'recovery'), { recursive: true });
  const stat = await fs.stat(o.storeRoot).catch((err: unknown) => {
    throw new Error(`cannot export ${o.storeRoot} of host ${o.hostName}: it does not exist`, { cause: err });
  });
  if (!stat.isDirectory()) throw new Error(`cannot export ${o.storeRoot}: not a folder`);
  const conf = path.join(o.stateDir, 'ganesha.conf');
  await writeFileAtomic(conf, renderGaneshaConfig(o));
  const script = path.join(repoRoot(), 'deploy', 'nfs', 'run-ganesha.sh');
  const args = [conf, path.join(o.stateDir, 'ganesha.log'), path.join(o.stateDir, 'ganesha.pid')];
  const c = o.netns ? inNetns(o.netns, script, args) : { cmd: script, args };
  const proc = await spawnManaged(`nfs-${o.hostName}`, c.cmd, c.args, {
    logFile: path.join(o.stateDir, 'run.log'),
    readyWhen: {
      probe: () =>
        checkNfsExport(o.hostName, o.endpoint, o.netns).then(
          () => true,
          () => false,
        ),
    },
    readyTimeoutMs: o.readyTimeoutMs ?? 30_000,
  }).catch((err: unknown) => {
    throw new Error(
      `NFS export of host ${o.hostName} did not start; ganesha log ${path.join(o.stateDir, 'ganesha.log')}`,
      { cause: err },
    );
  });
  log.info({ host: o.hostName, url: nfsUrl(o.endpoint), pid: proc.pid }, 'NFS export up');
  return {
    hostName: o.hostName,
    endpoint: o.endpoint,
    process: proc,
    stop: async () => {
      await proc.stop('SIGTERM', 5000);
      log.info({ host: o.hostName }, 'NFS export stopped');
    },
  };
}

/**
 * Checks that another host's store answers where this host opens it: through its kernel NFS mount under
 * `mountRoot` (listed by a child process, so a hung mount costs a killed `ls`, not a stuck worker).
 */
export async function checkMountedStore(hostName: string, mountRoot: string): Promise<void> {
  const dir = path.join(mountRoot, hostName);
  try {
    await runCommand('ls', [`${dir}/`], { timeoutMs: CHECK_TIMEOUT_MS });
  } catch (err) {
    throw new Error(`the store of host ${hostName}, mounted at ${dir}, is unreachable`, { cause: err });
  }
}

/**
 * Checks every other host's store the ways this host reaches them: libnfs (`nfs-ls`, as QEMU opens
 * `nfs://` disks) and/or the kernel mounts under `mountRoot` (Xen's disks, QEMU with `mounts`); the error
 * lists each unreachable one.
 */
export async function checkClusterExports(
  self: string,
  endpoints: Record<string, NfsEndpoint>,
  via: { libnfs: boolean; mountRoot?: string; netns?: string },
): Promise<void> {
  const others = Object.entries(endpoints).filter(([h]) => h !== self);
  const { mountRoot, netns } = via;
  const results = await Promise.allSettled([
    ...(via.libnfs ? others.map(([h, e]) => checkNfsExport(h, e, netns)) : []),
    ...(mountRoot ? others.map(([h]) => checkMountedStore(h, mountRoot)) : []),
  ]);
  const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed.length > 0)
    throw new Error(`host ${self} cannot reach: ${failed.map((f) => describeError(f.reason)).join('; ')}`);
}
