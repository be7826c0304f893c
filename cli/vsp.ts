#!/usr/bin/env node
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Command, CommanderError, Option } from 'commander';
import { TaskClient, TaskClientError, type OwnerTaskSpec, type TaskSummary } from '../client/taskClient';
import { checkHost, checkPhase, parseSince, TASK_PHASES, type TaskListFilter } from '../client/taskFilter';
import { taskFailureMessage, VspClient } from '../client/vspClient';
import { RepositoryClient } from '../repository/client';
import { TaskSpecError } from '../spec/taskSpec';
import type { MigrateRequest, ResizeRequest, TaskResult, TaskStatus } from '../workflows/definitions';
import { commandGroup, IMAGE_GROUP_DESCRIPTION, registerAdminCommands } from './adminCommands';
import { registerClusterCommands } from './clusterCommands';
import { registerHostCommands } from './hostCommands';
import { createProgressDisplay, type DisplayedStatus } from './progressDisplay';
import { loadSettings } from './settingsFile';
import { tuneHeapForStreaming } from '../lib/streamingHeap';

/**
 * `vsp`: upload inputs, submit and watch tasks, cancel them, fetch outputs; and the repository's
 * admin commands. Settings from the environment: VSP_REPOSITORY_URL, VSP_TOKEN, VSP_OWNER, VSP_REPO_DIR,
 * and, for operators' --temporal, Temporal's own TEMPORAL_* variables.
 */
const program = new Command('vsp')
  .description('VSP: tasks in VMs with their data, on Temporal')
  .option('--json', 'machine-readable output: results on stdout, errors on stderr, one JSON value a line')
  // Every command's help lists --json, which is accepted before or after the command's name.
  .configureHelp({ showGlobalOptions: true })
  .addHelpText(
    'after',
    `
Environment:
  VSP_REPOSITORY_URL  the repository (files, images, tasks), e.g. http://127.0.0.1:8420
  VSP_TOKEN           your owner token (vsp token create); your tasks and files are the token's owner's
  VSP_OWNER           optional: the owner to address (only your own is allowed)
  VSP_REPO_DIR        admin commands: the repository's data folder
  TEMPORAL_ADDRESS    operators' --temporal: the Temporal frontend (also TEMPORAL_NAMESPACE, TLS settings)
  VSP_ENV_FILE        a file of KEY=value lines for the variables above that are unset (default
                      ~/.config/vsp/env, which the demo writes; empty: none)

Exit codes: 0 done, 1 error, 2 invalid spec, 3 task failed, 4 task cancelled.`,
  )
  .showHelpAfterError()
  // Usage errors come back to run() (as CommanderError), which reports them as JSON under --json; the
  // error and the help after it are then not written (standard error holds JSON alone).
  .exitOverride()
  .configureOutput({ writeErr: (text) => void (json() || process.stderr.write(text)) });

const json = () => Boolean(program.opts().json);

function print(human: string, data: unknown): void {
  process.stdout.write(json() ? `${JSON.stringify(data)}\n` : `${human}\n`);
}

function need(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
}

const repoOption = () => new Option('--repository <url>', 'repository URL').env('VSP_REPOSITORY_URL');
const ownerOption = () =>
  new Option(
    '--owner <name>',
    "whose space or tasks (default: the token's owner; only your own is allowed)",
  ).env('VSP_OWNER');

/** Where the owners' commands' credential comes from (never an option: it would show in `ps`). */
const TOKEN_HELP =
  "\nNeeds VSP_TOKEN: an owner token (vsp token create <owner> <name>); the owner is the token's.";

function repository(opts: { repository?: string }): RepositoryClient {
  if (!opts.repository) throw new Error('the repository URL is missing: --repository or VSP_REPOSITORY_URL');
  return new RepositoryClient({ url: opts.repository, token: need('VSP_TOKEN') });
}

/** The owner named, or the token's own (the repository says whose it is). */
async function ownerOf(opts: { repository?: string; owner?: string }): Promise<string> {
  return opts.owner ?? ownerTasks(opts).ownerName();
}

registerAdminCommands(program);
registerClusterCommands(program);
registerHostCommands(program, table);

program
  .command('upload <local> [remote]')
  .description("upload a file to the owner's space (remote defaults to the file name)")
  .addOption(repoOption())
  .addOption(ownerOption())
  .addHelpText('after', TOKEN_HELP)
  .action(async (local: string, remote: string | undefined, opts) => {
    const info = await repository(opts).upload(await ownerOf(opts), remote ?? path.basename(local), local);
    print(`${info.path}  ${info.size} bytes  sha256 ${info.sha256}`, info);
  });
program
  .command('download')
  .description(
    "download a file (atomic, checksum verified); with '-', to standard output (checked at the end: exit 1 " +
      'if the bytes did not match)',
  )
  .argument('<remote>', "its path in the owner's space")
  .argument('[local]', "where to write it (default: its base name, here); '-' for standard output")
  .addOption(repoOption())
  .addOption(ownerOption())
  .addHelpText('after', TOKEN_HELP)
  .action(async (remote: string, local: string | undefined, opts) => {
    const client = repository(opts);
    const owner = await ownerOf(opts);
    // Standard output carries the bytes alone: no summary line after them.
    if (local === '-')
      return void (await client.downloadTo(owner, remote, process.stdout).catch((err: unknown) => {
        // The reader stopped early (`| head`): as for any writer in a pipe, nothing to say; not 0, though.
        if ((err as { cause?: { code?: string } }).cause?.code === 'EPIPE')
          throw new CliExit(EXIT.error, '', { cause: err });
        throw err;
      }));
    const info = await client.download(owner, remote, local ?? path.basename(remote));
    print(`${local ?? path.basename(remote)}  ${info.size} bytes  sha256 ${info.sha256}`, info);
  });
program
  .command('ls [prefix]')
  .description("list the owner's files")
  .addOption(repoOption())
  .addOption(ownerOption())
  .addHelpText('after', TOKEN_HELP)
  .action(async (prefix: string | undefined, opts) => {
    const files = await repository(opts).list(await ownerOf(opts), prefix);
    print(
      files.map((f) => `${String(f.size).padStart(12)}  ${f.sha256.slice(0, 12)}  ${f.path}`).join('\n') ||
        'no files',
      files,
    );
  });

commandGroup(program, 'image', IMAGE_GROUP_DESCRIPTION)
  .command('ls')
  .description(
    "list images with format, sizes, checksum and status; NAME is what a task spec's 'image' takes",
  )
  .addOption(repoOption())
  .addOption(ownerOption())
  .addHelpText('after', TOKEN_HELP)
  .action(async (opts) => {
    const images = await repository(opts).listImages(await ownerOf(opts));
    const size = (n?: number) => (n === undefined ? '-' : String(n)).padStart(12);
    print(
      images
        .map(
          (i) =>
            `${i.status.padEnd(10)} ${(i.format ?? '-').padEnd(6)} ${size(i.virtualBytes)} ${size(i.bytes)}` +
            `  ${i.sha256.slice(0, 12)}  ${i.name}${i.error ? `  (${i.error})` : ''}`,
        )
        .join('\n') || 'no images',
      images,
    );
  });

/*
 * Task commands. Owners go through the repository's task API with their token (the owner is the token's;
 * only their own tasks are visible). Operators add --temporal to use a Temporal connection directly
 * (TEMPORAL_ADDRESS, ...); starting a task that way needs a capability from `vsp task grant`.
 */

/** Exit codes scripts can rely on: 0 done (or running), 1 error, 2 invalid spec, 3 task failed, 4 cancelled. */
const EXIT = { error: 1, invalidSpec: 2, taskFailed: 3, taskCancelled: 4 } as const;

/** An error that sets the exit code. */
class CliExit extends Error {
  constructor(
    readonly exitCode: number,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** What the task commands need, from either path. */
interface TaskAccess {
  status(taskId: string): Promise<{
    phase?: string;
    host?: string;
    address?: string;
    error?: string;
    queue?: TaskStatus['queue'];
    progress?: number;
    progressMessage?: string;
  }>;
  watch(taskId: string, onStatus: (s: DisplayedStatus) => void): Promise<TaskResult>;
  cancel(taskId: string, reason?: string): Promise<TaskStatus>;
  migrate(taskId: string, request: MigrateRequest): Promise<TaskStatus>;
  resize(taskId: string, request: ResizeRequest): Promise<TaskStatus>;
  list(filter: TaskListFilter): Promise<TaskSummary[]>;
  /** The task's log so far (owners' path only). */
  logText?(taskId: string): Promise<string>;
}

interface TaskCommandOptions {
  repository?: string;
  owner?: string;
  temporal?: boolean;
}

/** The repository options every task command takes, and --temporal where operators may use it. */
function taskCommand(name: string, description: string, operators = true, parent = program): Command {
  const cmd = parent
    .command(name)
    .description(description)
    .addOption(repoOption())
    .addOption(ownerOption())
    .addHelpText('after', TOKEN_HELP);
  return operators
    ? cmd
        .option('--temporal', 'operators: use Temporal directly (TEMPORAL_ADDRESS, ...), not the repository')
        .addHelpText(
          'after',
          'With --temporal: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TEMPORAL_TLS_* instead.',
        )
    : cmd;
}

function ownerTasks(opts: TaskCommandOptions): TaskClient {
  if (!opts.repository) throw new Error('the repository URL is missing: --repository or VSP_REPOSITORY_URL');
  return new TaskClient({ url: opts.repository, token: need('VSP_TOKEN'), owner: opts.owner });
}

async function tasks(opts: TaskCommandOptions): Promise<TaskAccess> {
  if (!opts.temporal) return ownerTasks(opts);
  const vsp = await VspClient.connect();
  return {
    status: (id) => vsp.status(id),
    watch: (id, onStatus) => vsp.watch(id, onStatus),
    cancel: (id, reason) => vsp.cancel(id, reason),
    migrate: (id, request) => vsp.migrate(id, request),
    resize: (id, request) => vsp.resize(id, request),
    list: (o) => vsp.list({ ...o, owner: opts.owner }),
  };
}

taskCommand(
  'submit <spec>',
  "start a task from a JSON spec (a file, or '-' for standard input); its owner is the token's",
  false,
)
  .option('--task-id <id>', 'task id (default: generated)')
  .option('--watch', 'follow the task until it ends (exit code as for watch)')
  .addHelpText(
    'after',
    '\nOperators start a task without the repository with `vsp task grant` and `temporal workflow start`.',
  )
  .action(async (specArg: string, opts: TaskCommandOptions & { taskId?: string; watch?: boolean }) => {
    const text = specArg === '-' ? await readStdin() : await fs.readFile(specArg, 'utf8');
    let spec: unknown;
    try {
      spec = JSON.parse(text);
    } catch (err) {
      throw new Error(`the task spec is not valid JSON: ${(err as Error).message}`);
    }
    const client = ownerTasks(opts);
    const submitted = await client.submit(spec as OwnerTaskSpec, { taskId: opts.taskId }).catch((err) => {
      // The repository checked the spec: a 400 names the bad fields.
      throw err instanceof TaskClientError && err.status === 400
        ? new CliExit(EXIT.invalidSpec, err.message, { cause: err })
        : err;
    });
    if (!opts.watch) return print(submitted.taskId, submitted);
    if (!json())
      process.stderr.write(`task ${submitted.taskId} started; results in ${submitted.resultsPath}\n`);
    await watch(client, submitted.taskId);
  });

taskCommand(
  'watch <task-id>',
  'follow a task with a progress display until it ends (exit 0, 3 failed, 4 cancelled)',
).action(async (taskId: string, opts: TaskCommandOptions) => watch(await tasks(opts), taskId));

taskCommand(
  'wait <task-id>',
  'wait, silently, until a task ends; print its result (exit 0, 3 failed, 4 cancelled)',
).action(async (taskId: string, opts: TaskCommandOptions) =>
  watch(await tasks(opts), taskId, { display: false }),
);

taskCommand(
  'logs <task-id>',
  "print a task's output and its VM's console: live while it runs, the stored log after it ends",
  false,
)
  .option('-f, --follow', 'keep printing new output until the task ends')
  .action(async (taskId: string, opts: TaskCommandOptions & { follow?: boolean }) => {
    for await (const chunk of await ownerTasks(opts).logs(taskId, { follow: opts.follow }))
      if (!process.stdout.write(chunk)) await new Promise((r) => process.stdout.once('drain', r));
  });

taskCommand(
  'status <task-id>',
  "show a task's phase, host, address, progress and error (exit 0 running or completed, 3 failed, 4 cancelled)",
).action(async (taskId: string, opts: TaskCommandOptions) => {
  const s = await (await tasks(opts)).status(taskId);
  const q = s.queue;
  // The last report while the task runs (once ended, `--json` still has it).
  const progress =
    s.phase === 'running' && s.progress !== undefined
      ? ` (${s.progress.toFixed(0)}%${s.progressMessage ? ` ${s.progressMessage}` : ''})`
      : '';
  print(
    `${s.phase ?? 'unknown'}${q ? ` (${q.position} of ${q.of} in the queue${q.why ? `: ${q.why}` : ''})` : ''}${s.host ? ` on ${s.host}` : ''}${s.address ? ` at ${s.address}` : ''}${progress}${s.error ? `: ${s.error}` : ''}`,
    s,
  );
  const code = endedExitCode(s.phase);
  if (code) throw new CliExit(code, '');
});

taskCommand('cancel <task-id>', 'cancel a running task: its VM is stopped, its logs kept in the repository')
  .option('--reason <text>', 'why, recorded with the task')
  .action(async (taskId: string, opts: TaskCommandOptions & { reason?: string }) => {
    const s = await (await tasks(opts)).cancel(taskId, opts.reason);
    print(`cancelling ${taskId} (was ${s.phase})`, s);
  });

program
  .command('describe <task-id>')
  .description(
    "operators: a task's Temporal record (TEMPORAL_ADDRESS, ...): status, summary, details and search attributes as values",
  )
  .action(async (taskId: string) => {
    const d = await (await VspClient.connect()).describe(taskId);
    const rows: [string, unknown][] = [
      ['task', `${d.taskId} (run ${d.runId})`],
      ['type', d.type],
      ['status', d.status],
      ['summary', d.summary ?? '-'],
      ['started', d.startTime],
      ['closed', d.closeTime ?? '-'],
      ['history', `${d.historyLength} events`],
      ...Object.entries(d.searchAttributes).sort(([a], [b]) => a.localeCompare(b)),
    ];
    const width = Math.max(...rows.map(([k]) => k.length));
    const lines = rows.map(([k, v]) => `${k.padEnd(width)}  ${Array.isArray(v) ? v.join(', ') : String(v)}`);
    print([...lines, ...(d.details ? ['', d.details] : [])].join('\n'), d);
  });

program
  .command('localize-disks <task-id>')
  .description(
    "operators: move a running task's disks to the host where its VM runs, while it runs (storage evacuation)",
  )
  .action(async (taskId: string) => {
    const s = await (await VspClient.connect()).localizeDisks(taskId);
    const last = s.storageMoves?.at(-1);
    print(
      `${taskId}: its disks are on ${s.storageHost} now (${last?.bytes} bytes in ${last?.mirrorMs} ms)`,
      s,
    );
  });

taskCommand('migrate <task-id>', "live-migrate a running task's VM; its disks stay on their host")
  .option('--to <host>', 'target host (default: placement chooses)')
  .option('--max-bandwidth <MiBps>', 'cap the transfer rate', (v) => Number(v))
  .action(async (taskId: string, opts: TaskCommandOptions & { to?: string; maxBandwidth?: number }) => {
    const s = await (
      await tasks(opts)
    ).migrate(taskId, { host: opts.to, maxBandwidthMiBps: opts.maxBandwidth });
    const last = s.migrations?.at(-1);
    print(
      `${taskId} now runs on ${s.host} (disks on ${s.storageHost})${
        last?.totalTimeMs !== undefined ? `: ${last.totalTimeMs} ms, downtime ${last.downtimeMs} ms` : ''
      }`,
      s,
    );
  });

// `vsp resize`, like the other task commands, and `vsp task resize`, in the task group.
for (const parent of [program, commandGroup(program, 'task', 'tasks')])
  taskCommand('resize <task-id>', "change a running task's CPU share on its host", true, parent)
    .option(
      '--cpu-cap <percent>',
      'at most this percent of one CPU (150 = one and a half; 0 lifts the cap)',
      wholeNumber('--cpu-cap'),
    )
    .option(
      '--cpu-weight <n>',
      'weight against other tasks when CPUs are contended (default 100)',
      wholeNumber('--cpu-weight'),
    )
    .action(async (taskId: string, opts: TaskCommandOptions & { cpuCap?: number; cpuWeight?: number }) => {
      if (opts.cpuCap === undefined && opts.cpuWeight === undefined)
        throw new Error('give --cpu-cap, --cpu-weight or both');
      const s = await (await tasks(opts)).resize(taskId, { capPercent: opts.cpuCap, weight: opts.cpuWeight });
      const share = s.cpuShare ?? {};
      print(
        `${taskId} on ${s.host}: CPU cap ${share.capPercent ? `${share.capPercent}%` : 'none'}, weight ${share.weight ?? 100}`,
        s,
      );
    });

/** A whole-number option's parser: the error names the option (the update checks the range). */
function wholeNumber(option: string): (v: string) => number {
  return (v) => {
    if (!/^\d+$/.test(v.trim())) throw new Error(`${option} must be a whole number, got '${v}'`);
    return Number(v);
  };
}

taskCommand('list', 'list your tasks, newest first')
  .option('--running', 'only running tasks')
  .option('--phase <phase>', `only tasks in this phase (${TASK_PHASES.join(', ')})`, checkPhase)
  .option('--host <host>', 'only tasks whose VM runs (or last ran) on this host', checkHost)
  .option(
    '--since <time>',
    'only tasks started since this ISO 8601 time (2026-12-01T17:00:00Z) or this long ago (90s, 30m, 1h, 7d)',
    (v) => parseSince(v),
  )
  .option('--limit <n>', "at most this many (the repository's most is 200)", wholeNumber('--limit'))
  .action(async (opts: TaskCommandOptions & TaskListFilter) => {
    const { running, phase, host, since, limit } = opts;
    const list = await (await tasks(opts)).list({ running, phase, host, since, limit });
    const rows = list.map((t) => [t.taskId, t.status, t.phase ?? '-', t.host ?? '-', t.startTime]);
    print(rows.length ? table(['TASK', 'STATUS', 'PHASE', 'HOST', 'STARTED'], rows) : 'no tasks', list);
  });

/** Columns padded to their widest cell. */
function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  return [header, ...rows]
    .map((r) =>
      r
        .map((c, i) => c.padEnd(widths[i]))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

function endedExitCode(phase: string | undefined): number {
  return phase === 'failed' ? EXIT.taskFailed : phase === 'cancelled' ? EXIT.taskCancelled : 0;
}

/** Follows the task until it ends, with the progress display unless `display` is false or --json. */
async function watch(client: TaskAccess, taskId: string, { display: shown = true } = {}): Promise<void> {
  const display = json() || !shown ? undefined : createProgressDisplay();
  let phase: string | undefined;
  try {
    const result = await client.watch(taskId, (s) => {
      phase = s.phase;
      display?.update(s);
    });
    display?.done();
    print(
      `task ${taskId} completed on ${result.host}: ${result.outputs.length} output file(s) in ${result.resultsPath}`,
      result,
    );
  } catch (err) {
    display?.done();
    if (phase === 'failed' && !json()) await showLogTail(client, taskId);
    const reason =
      err instanceof TaskClientError && err.status === 422 ? err.reason : taskFailureMessage(err);
    throw new CliExit(endedExitCode(phase) || EXIT.error, `task ${taskId} ${phase ?? 'failed'}: ${reason}`, {
      cause: err,
    });
  }
}

/** Lines of a failed task's log the CLI shows with its failure. */
const FAILURE_TAIL_LINES = 20;

/** The end of a failed task's log on standard error, so its cause is seen without downloading task.log. */
async function showLogTail(client: TaskAccess, taskId: string): Promise<void> {
  const text = await client.logText?.(taskId).catch(() => undefined);
  if (!text) return;
  const lines = text.replace(/\n$/, '').split('\n').slice(-FAILURE_TAIL_LINES);
  process.stderr.write(
    `--- the last ${lines.length} line(s) of the task's log (vsp logs ${taskId}) ---\n${lines.join('\n')}\n---\n`,
  );
}

/** The error's message with the causes it does not already say (a failed update's reason, ...). */
function fullMessage(err: unknown): string {
  if (err instanceof CliExit) return err.message;
  let msg = err instanceof Error ? err.message : String(err);
  for (let e = err instanceof Error ? err.cause : undefined; e instanceof Error; e = e.cause)
    if (e.message && !msg.includes(e.message)) msg += `: ${e.message}`;
  return msg;
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/** Runs `vsp` with `argv` (node's, script included); resolves with the exit code. */
export async function run(argv = process.argv): Promise<number> {
  try {
    loadSettings();
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      // --help and --version end here too (exit code 0); a usage error was printed unless --json.
      if (json() && err.exitCode !== 0) {
        const error =
          err.code === 'commander.help'
            ? 'no command given (vsp --help lists them)'
            : err.message.replace(/^error: /, '');
        process.stderr.write(`${JSON.stringify({ error, exitCode: err.exitCode })}\n`);
      }
      return err.exitCode;
    }
    const exitCode =
      err instanceof CliExit ? err.exitCode : err instanceof TaskSpecError ? EXIT.invalidSpec : EXIT.error;
    const msg = fullMessage(err);
    // With --json, scripts read the error as JSON too (standard output may hold a result already).
    if (msg) process.stderr.write(json() ? `${JSON.stringify({ error: msg, exitCode })}\n` : `vsp: ${msg}\n`);
    return exitCode;
  }
}

export { program };

if (require.main === module) {
  tuneHeapForStreaming();
  void run().then((code) => process.exit(code));
}
