import { execFile } from 'node:child_process';

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
      execFile(
        file,
        [...prefix, ...args],
        {
          timeout: opts.timeoutMs,
          killSignal: 'SIGKILL',
          signal: opts.signal,
          maxBuffer: 4 * 1024 * 1024,
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
    });
}

/** Messages xl prints for a domain that does not exist (as opposed to a toolstack that does not work). */
const NO_SUCH_DOMAIN = /invalid domain identifier|does not exist|can't get domid/i;

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

/** Whether xl works here: the toolstack is installed and this is dom0 of a running Xen. */
export async function checkToolstack(run: XlRunner, host: string): Promise<void> {
  try {
    await run(['info'], { timeoutMs: 15_000 });
  } catch (err) {
    throw new Error(`the Xen driver cannot run on host ${host}: xl does not work here`, { cause: err });
  }
}
