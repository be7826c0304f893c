#!/usr/bin/env node
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Command, Option } from 'commander';
import { taskFailureMessage, VspClient } from '../client/vspClient';
import { RepositoryClient } from '../repository/client';
import { TaskSpecError } from '../spec/taskSpec';
import { commandGroup, IMAGE_GROUP_DESCRIPTION, registerAdminCommands } from './adminCommands';
import { createProgressDisplay } from './progressDisplay';

/**
 * `vsp`: upload inputs, submit and watch tasks, cancel them, fetch outputs; and the repository's
 * admin commands. Settings from the environment: VSP_REPOSITORY_URL, VSP_TOKEN, VSP_OWNER, VSP_REPO_DIR,
 * and Temporal's own TEMPORAL_* variables.
 */
const program = new Command('vsp')
  .description('VSP: tasks in VMs with their data, on Temporal')
  .option('--json', 'machine-readable output')
  .showHelpAfterError();

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
const ownerOption = () => new Option('--owner <name>', 'owner whose space to use').env('VSP_OWNER');

function repository(opts: { repository?: string }): RepositoryClient {
  if (!opts.repository) throw new Error('the repository URL is missing: --repository or VSP_REPOSITORY_URL');
  return new RepositoryClient({ url: opts.repository, token: need('VSP_TOKEN') });
}

function ownerOf(opts: { owner?: string }): string {
  if (!opts.owner) throw new Error('the owner is missing: --owner or VSP_OWNER');
  return opts.owner;
}

registerAdminCommands(program);

program
  .command('upload <local> [remote]')
  .description("upload a file to the owner's space (remote defaults to the file name)")
  .addOption(repoOption())
  .addOption(ownerOption())
  .action(async (local: string, remote: string | undefined, opts) => {
    const info = await repository(opts).upload(ownerOf(opts), remote ?? path.basename(local), local);
    print(`${info.path}  ${info.size} bytes  sha256 ${info.sha256}`, info);
  });
program
  .command('download <remote> [local]')
  .description('download a file (atomic, checksum verified)')
  .addOption(repoOption())
  .addOption(ownerOption())
  .action(async (remote: string, local: string | undefined, opts) => {
    const info = await repository(opts).download(ownerOf(opts), remote, local ?? path.basename(remote));
    print(`${local ?? path.basename(remote)}  ${info.size} bytes  sha256 ${info.sha256}`, info);
  });
program
  .command('ls [prefix]')
  .description("list the owner's files")
  .addOption(repoOption())
  .addOption(ownerOption())
  .action(async (prefix: string | undefined, opts) => {
    const files = await repository(opts).list(ownerOf(opts), prefix);
    print(
      files.map((f) => `${String(f.size).padStart(12)}  ${f.sha256.slice(0, 12)}  ${f.path}`).join('\n'),
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
  .action(async (opts) => {
    const images = await repository(opts).listImages(ownerOf(opts));
    const size = (n?: number) => (n === undefined ? '-' : String(n)).padStart(12);
    print(
      images
        .map(
          (i) =>
            `${i.status.padEnd(10)} ${(i.format ?? '-').padEnd(6)} ${size(i.virtualBytes)} ${size(i.bytes)}` +
            `  ${i.sha256.slice(0, 12)}  ${i.name}${i.error ? `  (${i.error})` : ''}`,
        )
        .join('\n'),
      images,
    );
  });

program
  .command('submit <spec>')
  .description("start a task from a JSON spec (a file, or '-' for standard input)")
  .option('--task-id <id>', 'workflow id (default: generated)')
  .option('--watch', 'follow the task until it ends')
  .action(async (specArg: string, opts: { taskId?: string; watch?: boolean }) => {
    const text = specArg === '-' ? await readStdin() : await fs.readFile(specArg, 'utf8');
    let spec: unknown;
    try {
      spec = JSON.parse(text);
    } catch (err) {
      throw new Error(`the task spec is not valid JSON: ${(err as Error).message}`);
    }
    const client = await VspClient.connect();
    const { taskId, runId } = await client.submit(spec as never, { taskId: opts.taskId });
    if (!opts.watch) return print(taskId, { taskId, runId });
    if (!json()) process.stderr.write(`task ${taskId} started\n`);
    await watch(client, taskId);
  });
program
  .command('watch <task-id>')
  .description('follow a task with a progress display until it ends')
  .action(async (taskId: string) => watch(await VspClient.connect(), taskId));
program.command('status <task-id>').action(async (taskId: string) => {
  const s = await (await VspClient.connect()).status(taskId);
  print(
    `${s.phase}${s.host ? ` on ${s.host}` : ''}${s.address ? ` at ${s.address}` : ''}${s.error ? `: ${s.error}` : ''}`,
    s,
  );
});
program
  .command('cancel <task-id>')
  .option('--reason <text>')
  .action(async (taskId: string, opts: { reason?: string }) => {
    const s = await (await VspClient.connect()).cancel(taskId, opts.reason);
    print(`cancelling ${taskId} (was ${s.phase})`, s);
  });
program
  .command('migrate <task-id>')
  .description("live-migrate a running task's VM; its disks stay on their host")
  .option('--to <host>', 'target host (default: placement chooses)')
  .option('--max-bandwidth <MiBps>', 'cap the transfer rate', (v) => Number(v))
  .action(async (taskId: string, opts: { to?: string; maxBandwidth?: number }) => {
    const s = await (
      await VspClient.connect()
    ).migrate(taskId, { host: opts.to, maxBandwidthMiBps: opts.maxBandwidth });
    const last = s.migrations?.at(-1);
    print(
      `${taskId} now runs on ${s.host} (disks on ${s.storageHost})${
        last?.totalTimeMs !== undefined ? `: ${last.totalTimeMs} ms, downtime ${last.downtimeMs} ms` : ''
      }`,
      s,
    );
  });
program
  .command('list')
  .description('list tasks')
  .addOption(ownerOption())
  .option('--running', 'only running tasks')
  .action(async (opts: { owner?: string; running?: boolean }) => {
    const tasks = await (await VspClient.connect()).list(opts);
    print(
      tasks
        .map((t) => `${t.taskId}  ${t.status}  ${t.phase ?? ''}  ${t.host ?? ''}  ${t.startTime}`)
        .join('\n'),
      tasks,
    );
  });

async function watch(client: VspClient, taskId: string): Promise<void> {
  const display = json() ? undefined : createProgressDisplay();
  try {
    const result = await client.watch(taskId, (s) => display?.update(s));
    display?.done();
    print(
      `task ${taskId} completed on ${result.host}: ${result.outputs.length} output file(s) in ${result.resultsPath}`,
      result,
    );
  } catch (err) {
    display?.done();
    throw new Error(`task ${taskId} failed: ${taskFailureMessage(err)}`);
  }
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

program.parseAsync().then(
  () => process.exit(0),
  (err: unknown) => {
    const msg = err instanceof TaskSpecError ? err.message : err instanceof Error ? err.message : String(err);
    process.stderr.write(`vsp: ${msg}\n`);
    process.exit(err instanceof TaskSpecError ? 2 : 1);
  },
);
