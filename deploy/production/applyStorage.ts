import { constants as fsc, promises as fs } from 'node:fs';
import path from 'node:path';
import { Command } from 'commander';
import { runCommand } from '../../lib/runCommand';
import { createLogger, describeError } from '../../logging/logger';
import { writeFileAtomic } from '../../storage/durableFile';
import { replaceMarkedBlock } from './markedBlock';
import {
  EXPORTS_BEGIN,
  EXPORTS_END,
  GENERATED_MARKER,
  parseClusterStorageConfig,
  planHostStorage,
  SYSTEMD_UNIT_DIR,
  type ClusterStorageConfig,
  type StoragePlan,
} from './storagePlan';

/**
 * Writes a host's storage plan (storagePlan.ts): its /etc/exports block and its systemd mount units,
 * each file atomically and only when its content changes; removes the units of hosts that left the
 * cluster. With `activate` it then reloads systemd, starts the binds, re-exports and starts the
 * automounts of the other hosts. Running it twice changes nothing the second time.
 */

/** Runs a command; what it printed, where a caller reads it (a runner that returns nothing tells nothing). */
export type CommandRunner = (cmd: string, args: string[]) => Promise<{ stdout: string } | void>;

export interface ApplyStorageOptions {
  plan: StoragePlan;
  /** Folder standing for `/` (default `/`): files land under it. */
  root?: string;
  /** Report what would change; write nothing, run nothing. */
  dryRun?: boolean;
  /** Run systemctl and exportfs after writing (the real host; never with another root). */
  activate?: boolean;
  run?: CommandRunner;
}

export type ChangeAction = 'create' | 'update' | 'remove' | 'unchanged';

export interface FileChange {
  /** Path on the host (without the root prefix). */
  file: string;
  action: ChangeAction;
}

export interface ApplyStorageResult {
  changes: FileChange[];
  /** Commands run (empty unless activating). */
  commands: string[][];
}

const log = createLogger('deploy.storage');
const EXPORTS_FILE = '/etc/exports';

export async function applyStoragePlan(o: ApplyStorageOptions): Promise<ApplyStorageResult> {
  const root = o.root ?? '/';
  const at = (p: string) => path.join(root, p);
  const desired = new Map<string, string>();
  const currentExports = await readIfExists(at(EXPORTS_FILE));
  desired.set(
    EXPORTS_FILE,
    replaceMarkedBlock(currentExports ?? '', o.plan.exportsBlock, EXPORTS_BEGIN, EXPORTS_END),
  );
  for (const u of o.plan.units) desired.set(path.posix.join(SYSTEMD_UNIT_DIR, u.name), u.content);

  const changes: FileChange[] = [];
  for (const [file, content] of desired) {
    const now = file === EXPORTS_FILE ? currentExports : await readIfExists(at(file));
    changes.push({ file, action: now === undefined ? 'create' : now === content ? 'unchanged' : 'update' });
  }
  const stale = (await ownUnits(at(SYSTEMD_UNIT_DIR))).filter(
    (name) => !desired.has(path.posix.join(SYSTEMD_UNIT_DIR, name)),
  );
  for (const name of stale) changes.push({ file: path.posix.join(SYSTEMD_UNIT_DIR, name), action: 'remove' });
  if (o.dryRun) return { changes, commands: [] };

  const commands: string[][] = [];
  const run = async (cmd: string, ...args: string[]) => {
    commands.push([cmd, ...args]);
    return (await (o.run ?? defaultRunner)(cmd, args)) ?? undefined;
  };
  // Each systemctl that reloads the manager costs seconds on a busy host: units already enabled and
  // running are left alone, so a run that changes nothing reloads nothing.
  const enableNow = async (units: string[]) => {
    if (units.length === 0) return;
    const shown = await run('systemctl', 'show', '--property=UnitFileState,ActiveState', ...units);
    if (!shown || !allEnabledAndActive(shown.stdout, units.length))
      await run('systemctl', 'enable', '--now', ...units);
  };
  // Automounts first: their mounts cannot stop while the automount stands on the mount point.
  const staleOrdered = [...stale].sort(
    (a, b) => Number(b.endsWith('.automount')) - Number(a.endsWith('.automount')),
  );
  for (const name of staleOrdered) {
    if (o.activate) await run('systemctl', 'disable', '--now', name);
    await fs.rm(at(path.posix.join(SYSTEMD_UNIT_DIR, name)), { force: true });
  }
  for (const dir of o.plan.directories) await fs.mkdir(at(dir), { recursive: true });
  const owner = o.plan.storeOwner;
  // Ownership only on the real host: a review under --root may run unprivileged.
  if (o.activate) await fs.chown(at(o.plan.storeDir), owner.uid, owner.gid);
  await fs.chmod(at(o.plan.storeDir), owner.mode);
  await fs.mkdir(at(SYSTEMD_UNIT_DIR), { recursive: true });
  for (const c of changes) {
    if (c.action !== 'create' && c.action !== 'update') continue;
    await writePreservingMode(at(c.file), desired.get(c.file) as string);
  }
  if (!o.activate) return { changes, commands };

  if (stale.length > 0 || changes.some((c) => c.action !== 'unchanged' && c.file !== EXPORTS_FILE))
    await run('systemctl', 'daemon-reload');
  const unitsAt = (stage: 0 | 1) =>
    o.plan.units.filter((u) => u.stage === stage && u.enable).map((u) => u.name);
  await enableNow(unitsAt(0));
  // A changed mount is remounted (a changed address must take effect); drain the host's VMs first.
  const updatedMounts = changes
    .filter((c) => c.action === 'update' && c.file.endsWith('.mount'))
    .map((c) => path.posix.basename(c.file));
  if (updatedMounts.length > 0) await run('systemctl', 'try-restart', ...updatedMounts);
  await enableNow(['nfs-server.service']);
  await run('exportfs', '-ra');
  await enableNow(unitsAt(1));
  return { changes, commands };
}

/** `systemctl show` of `count` units says each is enabled and active (an automount: armed). */
export function allEnabledAndActive(shown: string, count: number): boolean {
  const values = shown
    .split('\n')
    .filter((l) => l.startsWith('UnitFileState=') || l.startsWith('ActiveState='));
  return (
    values.length === 2 * count &&
    values.every((l) => l === 'UnitFileState=enabled' || l === 'ActiveState=active')
  );
}

/** What activation needs, checked before anything is written, so a failed run changes nothing. */
export async function checkCanActivate(
  uid: number = process.getuid?.() ?? -1,
  searchPath: string = process.env.PATH ?? '',
): Promise<void> {
  const bad: string[] = [];
  if (uid !== 0)
    bad.push(
      'it must run as root (it writes /etc/exports and systemd units); or pass --root DIR or --dry-run',
    );
  const dirs = [...searchPath.split(':').filter(Boolean), '/usr/sbin', '/sbin'];
  const need: [string, string][] = [
    ['exportfs', 'nfs-kernel-server is not installed (no exportfs): apt-get install nfs-kernel-server'],
    ['mount.nfs', 'nfs-common is not installed (no mount.nfs): apt-get install nfs-common'],
    ['systemctl', 'systemd is not installed (no systemctl): the storage units need systemd'],
  ];
  for (const [tool, why] of need) if (!(await findExecutable(tool, dirs))) bad.push(why);
  if (bad.length > 0) throw new Error(`cannot set up the cluster storage: ${bad.join('; ')}`);
}

/** This host's QEMU account must have the cluster's uid and gid: NFS carries numbers, not names. */
export async function checkQemuAccount(
  account: ClusterStorageConfig['qemuAccount'],
  id: (flag: string) => Promise<string> = async (flag) =>
    (await runCommand('id', [flag, account.user], { timeoutMs: 5_000 })).stdout.trim(),
): Promise<void> {
  let uid: string;
  let gid: string;
  try {
    [uid, gid] = [await id('-u'), await id('-g')];
  } catch (err) {
    throw new Error(
      `QEMU's account ${account.user} does not exist here: run deploy/setup.sh with VSP_QEMU_UID=${account.uid} VSP_QEMU_GID=${account.gid}`,
      { cause: err },
    );
  }
  if (uid !== String(account.uid) || gid !== String(account.gid))
    throw new Error(
      `QEMU's account ${account.user} is ${uid}:${gid} here, but the cluster file says ${account.uid}:${account.gid}: every host needs the same numbers`,
    );
}

async function findExecutable(name: string, dirs: string[]): Promise<boolean> {
  for (const dir of dirs) {
    try {
      await fs.access(path.join(dir, name), fsc.X_OK);
      return true;
    } catch {
      // Not in this folder.
    }
  }
  return false;
}

const defaultRunner: CommandRunner = (cmd, args) => runCommand(cmd, args, { timeoutMs: 120_000 });

async function readIfExists(file: string): Promise<string | undefined> {
  try {
    return await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new Error(`cannot read ${file}`, { cause: err });
  }
}

/** Unit files this tool wrote earlier (they start with its marker). */
async function ownUnits(dir: string): Promise<string[]> {
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const own: string[] = [];
  for (const name of names.filter((n) => n.endsWith('.mount') || n.endsWith('.automount')).sort()) {
    const text = await readIfExists(path.join(dir, name));
    if (text?.startsWith(GENERATED_MARKER)) own.push(name);
  }
  return own;
}

/** Atomic write that keeps an existing file's permission bits (/etc/exports may be 0644 or stricter). */
async function writePreservingMode(file: string, content: string): Promise<void> {
  const mode = await fs.stat(file).then(
    (s) => s.mode & 0o7777,
    () => 0o644,
  );
  await writeFileAtomic(file, content);
  await fs.chmod(file, mode);
}

/** Human-readable summary of a run, one line per file and command. */
export function describeResult(r: ApplyStorageResult, dryRun: boolean): string {
  const verb: Record<ChangeAction, string> = dryRun
    ? { create: 'would create', update: 'would update', remove: 'would remove', unchanged: 'unchanged' }
    : { create: 'created', update: 'updated', remove: 'removed', unchanged: 'unchanged' };
  return [
    ...r.changes.map((c) => `${verb[c.action].padEnd(12)} ${c.file}`),
    ...r.commands.map((c) => `ran          ${c.join(' ')}`),
  ].join('\n');
}

/**
 * The storage command: `node dist/deploy/production/applyStorage.js --host a --config cluster.json
 * [--root DIR] [--dry-run]`. Writes the report to `out`; throws on any error (nothing written then,
 * except files already replaced atomically before a failing systemctl).
 */
export async function storageCommand(
  argv: string[],
  out: (text: string) => void,
): Promise<ApplyStorageResult> {
  const program = new Command('applyStorage')
    .description("Writes this host's kernel NFS export and the mounts of every other host's VM store")
    .requiredOption('--host <name>', 'this host, as named in the cluster file')
    .requiredOption(
      '--config <file>',
      'cluster file: {"mountRoot","storeDir","clusterStorage":{host:{address,exportPath}}}',
    )
    .option('--root <dir>', 'write under this folder instead of / (nothing is started)')
    .option('--dry-run', 'print what would change; write nothing')
    .exitOverride()
    .configureOutput({ writeErr: (text) => out(text), writeOut: (text) => out(text) })
    .parse(argv);
  const o = program.opts<{ host: string; config: string; root?: string; dryRun?: boolean }>();
  let raw: unknown;
  try {
    raw = JSON.parse(await fs.readFile(o.config, 'utf8'));
  } catch (err) {
    throw new Error(`cannot read the cluster file ${o.config}: ${describeError(err)}`, { cause: err });
  }
  const config = parseClusterStorageConfig(raw, `cluster file ${o.config}`);
  const plan = planHostStorage(config, o.host);
  if (o.root) {
    const st = await fs.stat(o.root).catch(() => undefined);
    if (!st?.isDirectory()) throw new Error(`--root ${o.root} is not an existing folder`);
  }
  const activate = !o.root && !o.dryRun;
  if (activate) {
    await checkCanActivate();
    await checkQemuAccount(config.qemuAccount);
  }
  const result = await applyStoragePlan({ plan, root: o.root, dryRun: o.dryRun, activate });
  out(`${describeResult(result, Boolean(o.dryRun))}\n`);
  for (const m of plan.mounts)
    out(`mount        ${m.where} <- ${m.what} (${m.type}${m.storeOf ? `, store of ${m.storeOf}` : ''})\n`);
  return result;
}

if (require.main === module) {
  storageCommand(process.argv, (text) => process.stdout.write(text)).catch((err: unknown) => {
    // Commander already printed its own usage errors.
    if ((err as { code?: string }).code?.startsWith('commander.')) {
      process.exitCode = (err as { exitCode?: number }).exitCode ?? 1;
      return;
    }
    log.error({ err: describeError(err) }, 'storage setup failed');
    process.stderr.write(`error: ${describeError(err)}\n`);
    process.exitCode = 1;
  });
}
