import path from 'node:path';
import { z } from 'zod';
import { loadConfig, nameList } from './env';
import { DRIVER_NAMES } from '../spec/taskSpec';
import { validateMountRoot } from '../storage/diskLocator';
import { HOST_NAME } from './names';
import { parseUidRange } from '../drivers/process/taskAccounts';
import { xenCpuListSetting } from '../drivers/xen/domainConfig';
import { DEFAULT_SCHEDULER_CONFIG, type SchedulerConfig } from '../scheduler/model';

const hostName = z.string().regex(HOST_NAME, 'host names are lower-case letters, digits and -');

const nfsEndpoint = z.object({
  address: z.ipv4('the export address must be an IPv4 address'),
  exportPath: z.string().regex(/^\/[A-Za-z0-9_.-]+$/, 'the export path is one absolute component like /vsp'),
});

/** JSON text from the environment, an object from the config file. */
const jsonObject = <T extends z.ZodType>(schema: T) =>
  z.preprocess((v) => {
    if (typeof v !== 'string') return v;
    try {
      return JSON.parse(v) as unknown;
    } catch {
      return v;
    }
  }, schema);

const hostPart = z.coerce
  .number()
  .int('firstHost and lastHost are whole numbers')
  .min(1, 'firstHost and lastHost lie within 1..254')
  .max(254, 'firstHost and lastHost lie within 1..254');
/** The cluster's VM network (drivers/qemu/vmNetwork.ts): the bridge VMs' taps join, and their /24. */
const vmNetwork = z
  .object(
    {
      bridge: z
        .string()
        .regex(/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,14}$/, 'bridge must be a link name (<= 15 characters)'),
      subnet: z
        .string()
        .regex(
          /^(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){2}$/,
          'subnet is the first three octets of the /24, like 10.77.0',
        ),
      firstHost: hostPart.optional(),
      lastHost: hostPart.optional(),
    },
    {
      error: (iss) =>
        iss.code === 'invalid_type' ? 'a JSON object {bridge, subnet[, firstHost, lastHost]}' : undefined,
    },
  )
  .strict()
  .refine(
    (n) => (n.firstHost ?? 100) <= (n.lastHost ?? 249),
    'firstHost must not exceed lastHost (defaults 100..249)',
  );

const driverName = z.enum(DRIVER_NAMES);

/** A string that `check` accepts; its error message becomes the issue's. */
const checkedString = (check: (text: string) => unknown) =>
  z.string().superRefine((text, ctx) => {
    try {
      check(text);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message });
    }
  });

const HostSchema = z.object({
  host: hostName,
  storeDir: z.string().min(1).optional(),
  repositoryUrl: z.url({ protocol: /^https?$/ }),
  repositoryToken: z.string().min(8, 'the repository service token is missing or too short'),
  drivers: nameList(driverName).default(['qemu']),
  defaultDriver: driverName.optional(),
  applianceDir: z.string().optional(),
  maxImageBytes: z.coerce
    .number()
    .int()
    .positive()
    .default(8 * 1024 ** 3),
  accel: z.enum(['auto', 'kvm', 'tcg']).default('auto'),
  /** The host's TSC frequency, for TCG microvm guests where /proc/cpuinfo does not tell it (accelerator.ts). */
  tscKhz: z.coerce.number().int().min(1_000).max(100_000_000).optional(),
  /** The uids the process driver gives its tasks, one each: "first-last", none of the host's accounts. */
  processUids: checkedString(parseUidRange).transform(parseUidRange).optional(),
  /** Where every host's store is mounted (deploy/production/storagePlan.ts): the Xen driver's disk paths. */
  mountRoot: checkedString(validateMountRoot).default('/var/lib/vsp/cluster'),
  /** Every host's NFS export of its VM store, by host name: {"a":{"address":"10.0.0.1","exportPath":"/vsp"}}. */
  clusterStorage: jsonObject(
    z.record(hostName, nfsEndpoint, 'a JSON object of host -> {address, exportPath}'),
  )
    .optional()
    .default({}),
  /** Network namespace to run QEMU in, for a worker started outside its test host's namespace. */
  netns: z
    .string()
    .regex(/^[A-Za-z0-9_.-]+$/, 'a network namespace name')
    .optional(),
  /** Service VMs get a tap on this network (an address that follows them across migrations). */
  vmNetwork: jsonObject(vmNetwork).optional(),
  /** The unprivileged account QEMU runs as (drivers/qemu/qemuAccount.ts). */
  qemuUser: z
    .string()
    .regex(/^[a-z_][a-z0-9_-]{0,31}$/, 'a user name like vsp-qemu')
    .refine((u) => u !== 'root', 'QEMU must not run as root')
    .default('vsp-qemu'),
  /**
   * How QEMU opens another host's disks: `nfs` (nfs:// through libnfs; the test hosts' ganesha) or
   * `mounts` (the kernel NFS mounts under mountRoot, production: exports keep `secure`).
   */
  qemuRemoteDisks: z.enum(['nfs', 'mounts']).default('nfs'),
  /**
   * `on`: QEMU tasks' VMs start from this host's saved state of the booted appliance instead of booting
   * (drivers/qemu/snapshot.ts; built in the background on first need, under <store>/snapshots).
   */
  qemuSnapshots: z.enum(['on', 'off']).default('off'),
  /** Xen guests: `pvh` (live-migratable) or `pv` (no live migration; hosts without HAP). */
  xenGuestType: z.enum(['pvh', 'pv']).default('pvh'),
  /** Xen guests run only on these physical CPUs (e.g. all but dom0's, when dom0 is pinned); default any. */
  xenGuestCpus: xenCpuListSetting.optional(),
  /** This host's migration credentials (deploy/migration-tls.sh): QEMU migrations then go over TLS only. */
  migrationTlsDir: z
    .string()
    .refine((d) => path.isAbsolute(d), 'an absolute folder')
    .optional(),
  migrationDowntimeMs: z.coerce.number().int().positive().optional(),
  migrationMaxBandwidth: z.coerce.number().int().positive().optional(),
  migrationTimeoutSec: z.coerce.number().int().positive().optional(),
  /** How often the worker's liveness heartbeat reaches Temporal (workflows/hostLiveness.ts). */
  heartbeatSec: z.coerce.number().int().min(1).max(60).default(5),
  /** How often the orphan reaper compares the VM store with Temporal (it also runs at start). */
  reaperIntervalSec: z.coerce.number().int().min(10).default(300),
  /** The vCPUs and memory this host offers to tasks (default: the machine's), before overcommit. */
  vcpus: z.coerce.number().int().min(1).max(4096).optional(),
  memoryMiB: z.coerce.number().int().min(64).optional(),
  /** Labels a task spec's `labels` selects hosts by: {"zone":"a","gpu":"no"}. */
  labels: jsonObject(
    z.record(
      z.string().regex(/^[a-z0-9][a-z0-9_.-]{0,62}$/, 'label names are lower-case letters, digits, _ . -'),
      z.string().max(253),
      'a JSON object of label -> value',
    ),
  )
    .optional()
    .default({}),
});

export type HostConfig = Omit<z.output<typeof HostSchema>, 'storeDir' | 'defaultDriver'> & {
  storeDir: string;
  /** Tasks that name no driver get the first VM driver; `process` never runs a task that did not ask. */
  defaultDriver?: z.output<typeof driverName>;
};

/** Configuration of a host worker: VSP_HOST, VSP_STORE_DIR, VSP_REPOSITORY_URL, ... (see README). */
export function loadHostConfig(env: NodeJS.ProcessEnv = process.env): HostConfig {
  const c = loadConfig(
    HostSchema,
    {
      host: 'VSP_HOST',
      storeDir: 'VSP_STORE_DIR',
      repositoryUrl: 'VSP_REPOSITORY_URL',
      repositoryToken: 'VSP_REPOSITORY_TOKEN',
      drivers: 'VSP_DRIVERS',
      defaultDriver: 'VSP_DEFAULT_DRIVER',
      applianceDir: 'VSP_APPLIANCE_DIR',
      maxImageBytes: 'VSP_MAX_IMAGE_BYTES',
      accel: 'VSP_ACCEL',
      tscKhz: 'VSP_TSC_KHZ',
      processUids: 'VSP_PROCESS_UIDS',
      mountRoot: 'VSP_MOUNT_ROOT',
      clusterStorage: 'VSP_CLUSTER_STORAGE',
      netns: 'VSP_NETNS',
      vmNetwork: 'VSP_VM_NETWORK',
      qemuUser: 'VSP_QEMU_USER',
      migrationTlsDir: 'VSP_MIGRATION_TLS_DIR',
      qemuRemoteDisks: 'VSP_QEMU_REMOTE_DISKS',
      qemuSnapshots: 'VSP_QEMU_SNAPSHOTS',
      xenGuestType: 'VSP_XEN_GUEST_TYPE',
      xenGuestCpus: 'VSP_XEN_GUEST_CPUS',
      migrationDowntimeMs: 'VSP_MIGRATION_DOWNTIME_MS',
      migrationMaxBandwidth: 'VSP_MIGRATION_MAX_BANDWIDTH',
      migrationTimeoutSec: 'VSP_MIGRATION_TIMEOUT_SEC',
      heartbeatSec: 'VSP_HOST_HEARTBEAT_SEC',
      reaperIntervalSec: 'VSP_REAPER_INTERVAL_SEC',
      vcpus: 'VSP_HOST_VCPUS',
      memoryMiB: 'VSP_HOST_MEMORY_MIB',
      labels: 'VSP_HOST_LABELS',
    },
    env,
  );
  if (c.defaultDriver === 'process')
    throw new Error(
      'invalid configuration: VSP_DEFAULT_DRIVER=process: the process driver runs only tasks that name it',
    );
  const defaultDriver = c.defaultDriver ?? c.drivers.find((d) => d !== 'process');
  if (defaultDriver && !c.drivers.includes(defaultDriver))
    throw new Error(`invalid configuration: VSP_DEFAULT_DRIVER=${defaultDriver} is not in VSP_DRIVERS`);
  const others = Object.keys(c.clusterStorage).filter((h) => h !== c.host);
  if (others.length > 0 && !c.clusterStorage[c.host])
    throw new Error(
      `invalid configuration: VSP_CLUSTER_STORAGE lists ${others.join(', ')} but not this host (${c.host}): it needs its own export to receive migrations`,
    );
  return {
    ...c,
    storeDir: path.resolve(c.storeDir ?? path.join('.vsp', 'hosts', c.host)),
    ...(defaultDriver ? { defaultDriver } : {}),
  };
}

const ratio = z.coerce
  .number()
  .min(0.1, 'overcommit ratios lie within 0.1..64')
  .max(64, 'overcommit ratios lie within 0.1..64');

const ControlSchema = z.object({
  hosts: nameList(hostName),
  /** A host whose worker has not heartbeated for this long counts as down (several heartbeat periods). */
  hostLivenessSec: z.coerce.number().int().positive().default(30),
  /** The scheduler (scheduler/model.ts): placement policy, locality, overcommit, per-task disk. */
  policy: z.enum(['spread', 'pack']).default(DEFAULT_SCHEDULER_CONFIG.policy),
  locality: z.stringbool().default(DEFAULT_SCHEDULER_CONFIG.locality),
  cpuOvercommit: ratio.default(DEFAULT_SCHEDULER_CONFIG.cpuOvercommit),
  memoryOvercommit: ratio.default(DEFAULT_SCHEDULER_CONFIG.memoryOvercommit),
  diskOvercommit: ratio.default(DEFAULT_SCHEDULER_CONFIG.diskOvercommit),
  taskDiskMiB: z.coerce.number().int().min(0).default(DEFAULT_SCHEDULER_CONFIG.taskDiskMiB),
  antiAffinity: z.stringbool().default(false),
  /** Rebalancing's Schedule period; 0 (the default) leaves it off. */
  rebalanceEverySec: z.coerce.number().int().min(0).max(86_400).default(0),
  rebalanceThreshold: z.coerce.number().min(0).max(2).default(0.05),
  rebalanceMaxInFlight: z.coerce.number().int().min(1).max(16).default(1),
  /** After any live migration, the VM's disks follow it (a task's spec may say otherwise). */
  localizeDisksAfterMigration: z.stringbool().default(false),
});

export type ControlConfig = z.output<typeof ControlSchema>;

/** Configuration of the control worker: VSP_HOSTS lists the cluster's hosts; VSP_SCHED_* its scheduler. */
export function loadControlConfig(env: NodeJS.ProcessEnv = process.env): ControlConfig {
  return loadConfig(
    ControlSchema,
    {
      hosts: 'VSP_HOSTS',
      hostLivenessSec: 'VSP_HOST_LIVENESS_SEC',
      policy: 'VSP_SCHED_POLICY',
      locality: 'VSP_SCHED_LOCALITY',
      cpuOvercommit: 'VSP_SCHED_CPU_OVERCOMMIT',
      memoryOvercommit: 'VSP_SCHED_MEMORY_OVERCOMMIT',
      diskOvercommit: 'VSP_SCHED_DISK_OVERCOMMIT',
      taskDiskMiB: 'VSP_SCHED_TASK_DISK_MIB',
      antiAffinity: 'VSP_SCHED_ANTI_AFFINITY',
      rebalanceEverySec: 'VSP_SCHED_REBALANCE_EVERY_SEC',
      rebalanceThreshold: 'VSP_SCHED_REBALANCE_THRESHOLD',
      rebalanceMaxInFlight: 'VSP_SCHED_REBALANCE_MAX_IN_FLIGHT',
      localizeDisksAfterMigration: 'VSP_LOCALIZE_DISKS_AFTER_MIGRATION',
    },
    env,
  );
}

/** The scheduler's configuration from a control worker's. */
export function schedulerConfigOf(c: ControlConfig): SchedulerConfig {
  const { hosts, policy, locality, cpuOvercommit, memoryOvercommit, diskOvercommit, taskDiskMiB } = c;
  return {
    hosts,
    policy,
    locality,
    cpuOvercommit,
    memoryOvercommit,
    diskOvercommit,
    taskDiskMiB,
    ...(c.antiAffinity ? { antiAffinity: true } : {}),
    ...(c.rebalanceEverySec > 0
      ? {
          rebalance: {
            everySec: c.rebalanceEverySec,
            threshold: c.rebalanceThreshold,
            maxInFlight: c.rebalanceMaxInFlight,
          },
        }
      : {}),
  };
}
