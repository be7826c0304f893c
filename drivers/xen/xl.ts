import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { readProcStat } from '../processLiveness';

/**
 * How the Xen driver talks to the toolstack: `xl` subcommands run as a child process, never through a
 * shell. The runner is injectable so tests can stand in for a missing hypervisor.
 */

export interface XlResult {
  stdout: string;
  stderr: string;
}

export interface XlRunOptions {
  timeoutMs: number;
  signal?: AbortSignal;
  /** Called with each whole line xl writes to stderr, as it comes (xl migrate reports its steps there). */
  onStderrLine?: (line: string) => void;
  /** Called with xl's pid once it runs. */
  onSpawn?: (pid: number) => void;
}

/** Runs `xl <args>`; rejects with xl's own stderr in the message. */
export type XlRunner = (args: string[], opts: XlRunOptions) => Promise<XlResult>;

/** The xl state of a domain: `xl list` flags r/b (running/blocked), p, s, c, d. */
export type DomainState = 'running' | 'paused' | 'shutdown' | 'crashed' | 'dying';

/**
 * `command` runs xl: ['xl'] by default, or a wrapper such as ['ip', 'netns', 'exec', 'h1', 'xl'];
 * `env` replaces the environment xl runs with (default: this process's).
 */
export function xlRunner(command: string[] = ['xl'], env?: NodeJS.ProcessEnv): XlRunner {
  if (command.length === 0) throw new Error('the xl command is empty');
  const [file, ...prefix] = command;
  return (args, opts) =>
    new Promise((resolve, reject) => {
      const child = execFile(
        file,
        [...prefix, ...args],
        {
          timeout: opts.timeoutMs,
          killSignal: 'SIGKILL',
          signal: opts.signal,
          maxBuffer: 32 * 1024 * 1024,
          env,
        },
        (err, stdout, stderr) => {
          if (!err) return resolve({ stdout, stderr });
          const e = err as NodeJS.ErrnoException & { killed?: boolean };
          const why =
            e.code === 'ENOENT'
              ? `${file} is not installed: install xen-utils (the Xen toolstack) and boot this host under the Xen hypervisor`
              : e.name === 'AbortError'
                ? 'aborted'
                : e.killed
                  ? `timed out after ${opts.timeoutMs} ms`
                  : stderr.trim() || e.message;
          reject(new Error(`xl ${args.join(' ')}: ${why}`, { cause: err }));
        },
      );
      if (child.pid !== undefined) opts.onSpawn?.(child.pid);
      const onLine = opts.onStderrLine;
      if (onLine && child.stderr) {
        let partial = '';
        child.stderr.setEncoding('utf8');
        child.stderr.on('data', (chunk: string) => {
          const lines = (partial + chunk).split('\n');
          partial = lines.pop() ?? '';
          for (const line of lines) onLine(line);
        });
      }
    });
}

/** Messages xl prints for a domain that does not exist (as opposed to a toolstack that does not work). */
const NO_SUCH_DOMAIN = /invalid domain identifier|does not exist|can't get domid/i;

export const DEFAULT_XL_LOG_DIR = '/var/log/xen';

/** Xen's SHUTDOWN_* codes, as xl's per-domain log names them ("has shut down, reason code N"). */
const SHUTDOWN_REASONS = [
  'powered off',
  'rebooted (a kernel panic reboots the guest: panic=-1)',
  'suspended',
  'crashed',
  'stopped by its watchdog',
  'soft-reset',
];

/**
 * Why the domain shut down, from xl's log of it (`<logDir>/xl-<name>.log`), if it says. A reboot may be
 * Xen's doing rather than the guest's: an HVM/PVH guest that triple-faults is rebooted without a word on
 * its console, and only Xen's own log (`xl dmesg`) tells.
 */
export async function shutdownReason(
  run: XlRunner,
  logDir: string,
  name: string,
): Promise<string | undefined> {
  const text = await fs.readFile(path.join(logDir, `xl-${name}.log`), 'utf8').catch(() => '');
  const codes = [...text.matchAll(/Domain (\d+) has shut down, reason code (\d+)/g)];
  const last = codes.at(-1);
  if (!last) return undefined;
  const [, domid, code] = last;
  if (code === '1') {
    const xen = await run(['dmesg'], { timeoutMs: 15_000 }).then(
      (r) => r.stdout,
      () => '',
    );
    const fault = [...xen.matchAll(new RegExp(`^\\(XEN\\) (d${domid}v\\d+ Triple fault\\b.*)$`, 'gm'))].at(
      -1,
    );
    if (fault) return `triple-faulted (Xen: ${fault[1].trim()})`;
  }
  return SHUTDOWN_REASONS[Number(code)] ?? `reason code ${code}`;
}

/** The domain's state, or undefined when there is no such domain. */
export async function domainState(run: XlRunner, name: string): Promise<DomainState | undefined> {
  let out: XlResult;
  try {
    out = await run(['list', name], { timeoutMs: 15_000 });
  } catch (err) {
    if (NO_SUCH_DOMAIN.test(String((err as Error).message))) return undefined;
    throw err;
  }
  // Name ID Mem VCPUs State Time(s); the state is six flag columns like "-b----".
  const row = out.stdout
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .find((f) => f[0] === name);
  if (!row || row.length < 5)
    throw new Error(`xl list ${name} printed no row for the domain:\n${out.stdout}`);
  const flags = row[4];
  if (flags.includes('d')) return 'dying';
  if (flags.includes('c')) return 'crashed';
  if (flags.includes('s')) return 'shutdown';
  if (flags.includes('p')) return 'paused';
  return 'running';
}

/**
 * Whether xl works here (the toolstack is installed and this is dom0 of a running Xen) and, given
 * `consoleLogDir`, whether xenconsoled logs guest consoles there (the driver reads them there).
 */
export async function checkToolstack(run: XlRunner, host: string, consoleLogDir?: string): Promise<void> {
  try {
    await run(['info'], { timeoutMs: 15_000 });
  } catch (err) {
    throw new Error(`the Xen driver cannot run on host ${host}: xl does not work here`, { cause: err });
  }
  if (consoleLogDir === undefined) return;
  const daemons = await processesNamed('xenconsoled');
  const problem =
    daemons.length === 0
      ? 'xenconsoled is not running'
      : daemons.map((argv) => consoleLoggingProblem(argv, consoleLogDir)).find((p) => p !== undefined);
  if (problem)
    throw new Error(
      `the Xen driver cannot run on host ${host}: ${problem} (set XENCONSOLED_ARGS="--log=guest --log-dir=${consoleLogDir}" in /etc/default/xen and restart xen)`,
    );
}

const XENCONSOLED_LOG_DIR = '/var/log/xen/console';

/** What is wrong with xenconsoled's command line for the driver, or undefined when it logs guests to `logDir`. */
export function consoleLoggingProblem(argv: string[], logDir: string): string | undefined {
  const option = (name: string): string | undefined => {
    let value: string | undefined;
    argv.forEach((a, i) => {
      if (a.startsWith(`${name}=`)) value = a.slice(name.length + 1);
      else if (a === name) value = argv[i + 1];
    });
    return value;
  };
  const log = option('--log') ?? 'none';
  if (log !== 'guest' && log !== 'all') return `xenconsoled does not log guest consoles (--log=${log})`;
  const dir = path.resolve(option('--log-dir') ?? XENCONSOLED_LOG_DIR);
  return dir === path.resolve(logDir)
    ? undefined
    : `xenconsoled logs guest consoles to ${dir}, not ${logDir}`;
}

async function processesNamed(name: string, procDir = '/proc'): Promise<string[][]> {
  const found: string[][] = [];
  for (const argv of (await processes(procDir)).values())
    if (argv.length > 0 && path.basename(argv[0]) === name) found.push(argv);
  return found;
}

/** Every process's argv by pid (processes that ended while read are skipped). */
async function processes(procDir: string): Promise<Map<number, string[]>> {
  const out = new Map<number, string[]>();
  for (const entry of await fs.readdir(procDir)) {
    if (!/^\d+$/.test(entry)) continue;
    const argv = await fs
      .readFile(path.join(procDir, entry, 'cmdline'), 'utf8')
      .then((t) => t.split('\0').filter(Boolean))
      .catch(() => [] as string[]);
    if (argv.length > 0) out.set(Number(entry), argv);
  }
  return out;
}

/**
 * The pid of an `xl migrate` of domain `name` running on this host, if any. xl outlives a worker that
 * restarts (the host worker's unit stops only its main process), so a retried migration finds it still
 * sending the VM and waits for it instead of starting a second one.
 */
export async function xlMigrationOf(name: string, procDir = '/proc'): Promise<number | undefined> {
  for (const [pid, argv] of await processes(procDir)) if (isXlMigrateOf(argv, name)) return pid;
  return undefined;
}

/** Whether `argv` is `xl [-v...] migrate [options] <name> <host>`. */
export function isXlMigrateOf(argv: string[], name: string): boolean {
  if (argv.length < 4 || path.basename(argv[0]) !== 'xl') return false;
  const i = argv.indexOf('migrate');
  return i > 0 && argv.slice(1, i).every((a) => a.startsWith('-')) && argv.at(-2) === name;
}

/**
 * Bytes written so far by the children of `parent` whose command name starts with `comm` (from
 * /proc/<pid>/io, root only): `xl migrate` hands the memory stream to its libxl-save-helper, which writes
 * it to the ssh pipe, so its writes are the stream's bytes. 0 when there is no such child (yet, or any more).
 */
export async function bytesWrittenByChildren(
  parent: number,
  comm: string,
  procDir = '/proc',
): Promise<number> {
  let total = 0;
  for (const entry of await fs.readdir(procDir)) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await readProcStat(entry, procDir);
    if (!stat || Number(stat.fields[1]) !== parent || !stat.comm.startsWith(comm)) continue;
    const io = await fs.readFile(path.join(procDir, entry, 'io'), 'utf8').catch(() => '');
    total += Number(/^wchar: (\d+)$/m.exec(io)?.[1] ?? 0);
  }
  return total;
}
