import { promises as fs } from 'node:fs';
import path from 'node:path';
import { utils } from 'ssh2';
import { z } from 'zod';
import { HOST_NAME } from '../../config/names';
import { DRIVER_NAMES } from '../../spec/taskSpec';
import { xenCpuListSetting } from '../../drivers/xen/domainConfig';
import {
  ClusterStorageConfigSchema,
  DEFAULT_STORE_DIR,
  parseClusterStorageConfig,
  type ClusterStorageConfig,
} from '../production/storagePlan';

/**
 * The cluster inventory (`vsp cluster deploy --inventory cluster.json`): how to reach each hypervisor host
 * over SSH (its address and the host key it must present) and what the hosts share (Temporal, the
 * repository, the storage layout). `deploy/vmcluster` writes one for its virtual hosts; an operator writes
 * one for real hosts (deploy/production/README.md documents every field). Validated whole before any
 * connection: every error names its field.
 */

export const INVENTORY_VERSION = 1;

const absolutePath = (what: string) =>
  z.string().refine((p) => path.isAbsolute(p), `${what} must be an absolute path`);

/** `host:port` of Temporal's frontend, as the hosts (not only this machine) reach it. */
const hostPort = z
  .string()
  .regex(/^[A-Za-z0-9.-]+:\d{1,5}$/, 'an address host:port, e.g. 10.0.0.10:7233')
  .refine((a) => Number(a.split(':')[1]) >= 1 && Number(a.split(':')[1]) <= 65535, 'the port is 1..65535');

/** An OpenSSH public key line (`ssh-ed25519 AAAA... [comment]`), as in `/etc/ssh/ssh_host_*_key.pub`. */
const hostKeyLine = z.string().superRefine((line, ctx) => {
  const parsed = utils.parseKey(line.trim());
  const key = Array.isArray(parsed) ? parsed[0] : parsed;
  if (key instanceof Error || key.isPrivateKey())
    ctx.addIssue({
      code: 'custom',
      message: `not a public key line like "ssh-ed25519 AAAA..." (/etc/ssh/ssh_host_ed25519_key.pub on the host)${
        key instanceof Error ? `: ${key.message}` : ''
      }`,
    });
});

const exportPath = z
  .string()
  .regex(/^\/[A-Za-z0-9_.-]+$/, 'the export path is one absolute component like /vsp');
const storeDir = ClusterStorageConfigSchema.shape.storeDir.unwrap();

const HostSchema = z
  .object({
    name: z.string().regex(HOST_NAME, 'host names are lower-case letters, digits and - (at most 63)'),
    /** Where this machine reaches the host's sshd, and where the other hosts reach its NFS export. */
    address: z.ipv4('an IPv4 address'),
    hostKey: hostKeyLine,
    labels: z.record(z.string(), z.string()).default({}),
    /** This host's VM store, if not the cluster's `storeDir`. */
    storeDir: storeDir.optional(),
    /** The path this host exports its store as, if not the cluster's `exportPath`. */
    exportPath: exportPath.optional(),
  })
  .strict();

const ClusterSchema = z
  .object({
    temporalAddress: hostPort,
    temporalNamespace: z.string().min(1).default('default'),
    repositoryUrl: z.url({ protocol: /^https?$/, error: 'an http(s) URL the hosts reach' }),
    /**
     * A file on this machine holding the repository's service token (VSP_REPO_SERVICE_TOKEN there); it is
     * written to each host's worker environment (mode 0600), never into the inventory.
     */
    repositoryTokenFile: absolutePath('repositoryTokenFile'),
    driver: z.enum(DRIVER_NAMES).exclude(['process']).default('xen'),
    storeDir: storeDir.default(DEFAULT_STORE_DIR),
    mountRoot: ClusterStorageConfigSchema.shape.mountRoot,
    exportPath: exportPath.default('/vsp'),
    nfsVersion: ClusterStorageConfigSchema.shape.nfsVersion,
    qemuAccount: ClusterStorageConfigSchema.shape.qemuAccount.default({
      user: 'vsp-qemu',
      uid: 64090,
      gid: 64090,
    }),
    /**
     * Xen hosts: the physical CPUs guests run on (VSP_XEN_GUEST_CPUS), e.g. "1-7" when Xen boots with
     * `dom0_max_vcpus=1 dom0_vcpus_pin`. Default: any.
     */
    xenGuestCpus: xenCpuListSetting.optional(),
    /** Where each host keeps the guest appliance it builds (VSP_APPLIANCE_DIR). */
    applianceDir: absolutePath('applianceDir').default('/var/lib/vsp/appliance'),
    logLevel: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace']).default('info'),
  })
  .strict();

export const InventorySchema = z
  .object({
    version: z.literal(INVENTORY_VERSION, `the inventory format version is ${INVENTORY_VERSION}`),
    ssh: z
      .object({
        user: z
          .string()
          .regex(/^[a-z_][a-z0-9_-]{0,31}$/, 'a user name')
          .default('root'),
        identityFile: absolutePath('ssh.identityFile'),
        port: z.number().int().min(1).max(65535).default(22),
      })
      .strict(),
    hosts: z.array(HostSchema).min(1, 'the inventory lists no host'),
    /** Optional in vm-cluster's output; the deploy needs it. */
    cluster: ClusterSchema.optional(),
  })
  .strict();

export type Inventory = z.output<typeof InventorySchema>;
export type InventoryHost = Inventory['hosts'][number];
export type ClusterSettings = NonNullable<Inventory['cluster']>;
/** An inventory a deploy can run with: its `cluster` part is there. */
export type DeployInventory = Inventory & { cluster: ClusterSettings };

export class InventoryError extends Error {}

/** Validates a parsed inventory; the error lists every bad field by its path (`hosts[1].hostKey`). */
export function parseInventory(input: unknown, source = 'inventory'): Inventory {
  const r = InventorySchema.safeParse(input);
  if (!r.success)
    throw new InventoryError(
      `invalid ${source}: ${r.error.issues.map((i) => `${fieldPath(i.path)}: ${i.message}`).join('; ')}`,
    );
  const inv = r.data;
  const bad: string[] = [];
  const seen = new Map<string, number>();
  const byAddress = new Map<string, string>();
  inv.hosts.forEach((h, i) => {
    if (seen.has(h.name)) bad.push(`hosts[${i}].name: ${h.name} is also hosts[${seen.get(h.name)}]`);
    seen.set(h.name, i);
    const other = byAddress.get(h.address);
    if (other) bad.push(`hosts[${i}].address: ${h.address} is also host ${other}'s`);
    byAddress.set(h.address, h.name);
  });
  if (bad.length > 0) throw new InventoryError(`invalid ${source}: ${bad.join('; ')}`);
  if (inv.cluster) {
    try {
      clusterStorageOf(inv as DeployInventory);
    } catch (err) {
      throw new InventoryError(`invalid ${source}: ${(err as Error).message}`);
    }
  }
  return inv;
}

/** The inventory a deploy needs: with its `cluster` settings. */
export function requireDeployable(inv: Inventory, source = 'inventory'): DeployInventory {
  if (!inv.cluster)
    throw new InventoryError(
      `invalid ${source}: cluster: required for a deploy ({"temporalAddress", "repositoryUrl", "repositoryTokenFile", ...})`,
    );
  return inv as DeployInventory;
}

/** Reads and validates an inventory file. */
export async function loadInventory(file: string): Promise<Inventory> {
  let raw: unknown;
  try {
    raw = JSON.parse(await fs.readFile(file, 'utf8'));
  } catch (err) {
    throw new InventoryError(`cannot read the inventory ${file}: ${(err as Error).message}`, { cause: err });
  }
  return parseInventory(raw, `inventory ${file}`);
}

/**
 * The local files a deploy reads (the SSH key, the repository token), checked before any connection:
 * readable, parseable, and not readable by other accounts.
 */
export async function loadDeploySecrets(
  inv: DeployInventory,
): Promise<{ privateKey: Buffer; repositoryToken: string }> {
  const bad: string[] = [];
  const read = async (file: string, field: string): Promise<Buffer | undefined> => {
    try {
      const st = await fs.stat(file);
      if ((st.mode & 0o077) !== 0)
        bad.push(
          `${field}: ${file} is readable by other accounts (mode ${(st.mode & 0o777).toString(8)}): chmod 600 it`,
        );
      return await fs.readFile(file);
    } catch (err) {
      bad.push(`${field}: cannot read ${file}: ${(err as Error).message}`);
      return undefined;
    }
  };
  const privateKey = await read(inv.ssh.identityFile, 'ssh.identityFile');
  if (privateKey) {
    const parsed = utils.parseKey(privateKey);
    const key = Array.isArray(parsed) ? parsed[0] : parsed;
    if (key instanceof Error || !key.isPrivateKey())
      bad.push(
        `ssh.identityFile: ${inv.ssh.identityFile} is not an unencrypted private key${key instanceof Error ? ` (${key.message})` : ''}`,
      );
  }
  const tokenText = await read(inv.cluster.repositoryTokenFile, 'cluster.repositoryTokenFile');
  const repositoryToken = tokenText?.toString('utf8').split(/\r?\n/)[0].trim() ?? '';
  if (tokenText && repositoryToken.length < 16)
    bad.push('cluster.repositoryTokenFile: the token (its first line) is shorter than 16 characters');
  if (bad.length > 0 || !privateKey) throw new InventoryError(`cannot deploy: ${bad.join('; ')}`);
  return { privateKey, repositoryToken };
}

/** The storage configuration every host shares (deploy/production/storagePlan.ts), from the inventory. */
export function clusterStorageOf(inv: DeployInventory, host?: InventoryHost): ClusterStorageConfig {
  const c = inv.cluster;
  return parseClusterStorageConfig(
    {
      mountRoot: c.mountRoot,
      storeDir: host?.storeDir ?? c.storeDir,
      nfsVersion: c.nfsVersion,
      qemuAccount: c.qemuAccount,
      clusterStorage: Object.fromEntries(
        inv.hosts.map((h) => [h.name, { address: h.address, exportPath: h.exportPath ?? c.exportPath }]),
      ),
    },
    'cluster storage of the inventory',
  );
}

function fieldPath(p: PropertyKey[]): string {
  if (p.length === 0) return '(top)';
  return p.reduce<string>(
    (s, k) => (typeof k === 'number' ? `${s}[${k}]` : s ? `${s}.${String(k)}` : String(k)),
    '',
  );
}
