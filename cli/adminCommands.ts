import { createReadStream, promises as fs } from 'node:fs';
import { Option, type Command } from 'commander';
import {
  addKey,
  addOwner,
  clearPassword,
  createServiceToken,
  createToken,
  listKeys,
  listOwners,
  listTokens,
  removeKey,
  revokeToken,
  setOwnerDisabled,
  setPassword,
  setQuota,
  withAdmin,
} from '../repository/accounts/admin';
import { addBaseImage, removeBaseImage } from '../repository/store/imageStore';
import { backendSettingsFromEnv, migrateRepository, withBackend } from '../repository/store/backend';
import { grantTask } from '../repository/tasks/taskAdmission';
import { parseListen } from '../repository/main';
import { PAYLOAD_KEY_ENV, payloadCodecFromEnv, startCodecServer } from '../config/payloadCodec';

/**
 * The repository's admin commands (`vsp owner|token|key|password ...`), run on the repository host
 * against its data folder. Secrets are printed once (tokens) or read from standard input (passwords),
 * never taken as arguments, where `ps` and shell history would keep them.
 */

const dataDirOption = () =>
  new Option('--data-dir <dir>', "the repository's data folder").env('VSP_REPO_DIR').makeOptionMandatory();

function parseId(text: string, what: string): number {
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(Number(text)))
    throw new Error(`${what} ${JSON.stringify(text)} must be a whole number`);
  return Number(text);
}

/** A quota limit: a whole number, with an optional K/M/G/T (powers of 1024) for bytes, or 'none'. */
export function parseLimit(text: string, what: string, units: boolean): number | undefined {
  if (text === 'none') return undefined;
  const m = (units ? /^(\d+)([KMGT]?)(?:i?B)?$/i : /^(\d+)()$/).exec(text.trim());
  if (!m) {
    throw new Error(
      `${what} ${JSON.stringify(text)} must be a whole number${units ? ' (optionally with K, M, G or T)' : ''} or 'none'`,
    );
  }
  const value = Number(m[1]) * 1024 ** ' KMGT'.indexOf(m[2].toUpperCase() || ' ');
  if (!Number.isSafeInteger(value)) throw new Error(`${what} ${text} is too large`);
  return value;
}

async function readSecret(file: string): Promise<string> {
  const text = file === '-' ? await readStdin() : await fs.readFile(file, 'utf8');
  return text.split(/\r?\n/)[0];
}

async function readAll(stream: NodeJS.ReadableStream): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

async function readStdin(): Promise<string> {
  if (process.stdin.isTTY) process.stderr.write('password (then Enter; it is echoed): ');
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) {
    chunks.push(c as Buffer);
    if (process.stdin.isTTY && (c as Buffer).includes(10)) break;
  }
  return Buffer.concat(chunks).toString('utf8');
}

export const IMAGE_GROUP_DESCRIPTION =
  "VM images: the owner's (under images/) and the provider's base images (add-base, remove-base: admin)";

/** The subcommand `name` of `program`, made if absent: `vsp image` holds owner and admin commands. */
export function commandGroup(program: Command, name: string, description: string): Command {
  return program.commands.find((c) => c.name() === name) ?? program.command(name).description(description);
}

export function registerAdminCommands(program: Command): void {
  const print = (human: string, data: unknown): void => {
    process.stdout.write(program.opts().json ? `${JSON.stringify(data)}\n` : `${human}\n`);
  };

  const owner = program.command('owner').description('repository owners (admin, on the repository host)');
  owner
    .command('add <name>')
    .description('create an owner and print its first API token')
    .addOption(dataDirOption())
    .action(async (name: string, opts: { dataDir: string }) => {
      const r = await addOwner(opts.dataDir, name);
      print(r.token, r);
    });
  owner
    .command('list')
    .description('owners with their state, credentials, quota and usage')
    .addOption(dataDirOption())
    .action(async (opts: { dataDir: string }) => {
      const owners = await listOwners(opts.dataDir);
      const quota = (used: number, limit?: number) => (limit === undefined ? `${used}` : `${used}/${limit}`);
      print(
        owners
          .map(
            (o) =>
              `${o.name}${o.disabled ? ' (disabled)' : ''}  tokens ${o.activeTokens}  keys ${o.sshKeys}` +
              `  password ${o.hasPassword ? 'yes' : 'no'}  bytes ${quota(o.usage.bytes, o.quotaBytes)}` +
              `  files ${quota(o.usage.files, o.quotaFiles)}`,
          )
          .join('\n'),
        owners,
      );
    });
  for (const [verb, disabled] of [
    ['disable', true],
    ['enable', false],
  ] as const) {
    owner
      .command(`${verb} <name>`)
      .description(
        disabled ? 'refuse the owner on every protocol, at once (files are kept)' : 'let the owner in again',
      )
      .addOption(dataDirOption())
      .action(async (name: string, opts: { dataDir: string }) => {
        await setOwnerDisabled(opts.dataDir, name, disabled);
        print(`${name} ${verb}d`, { owner: name, disabled });
      });
  }
  owner
    .command('quota <name>')
    .description("set the owner's quota (files already stored are kept)")
    .requiredOption('--bytes <n>', "total bytes, e.g. 500G, or 'none'")
    .requiredOption('--files <n>', "number of files, or 'none'")
    .addOption(dataDirOption())
    .action(async (name: string, opts: { dataDir: string; bytes: string; files: string }) => {
      const quota = {
        bytes: parseLimit(opts.bytes, '--bytes', true),
        files: parseLimit(opts.files, '--files', false),
      };
      await setQuota(opts.dataDir, name, quota);
      print(`${name}: bytes ${quota.bytes ?? 'unlimited'}, files ${quota.files ?? 'unlimited'}`, {
        owner: name,
        ...quota,
      });
    });

  const token = program.command('token').description('API tokens (admin, on the repository host)');
  token
    .command('create <owner-or-service> <token-name>')
    .description("create a named token for an owner, or with 'service' one for host workers; printed once")
    .addOption(dataDirOption())
    .action(async (who: string, name: string, opts: { dataDir: string }) => {
      const t =
        who === 'service'
          ? await createServiceToken(opts.dataDir, name)
          : await createToken(opts.dataDir, who, name);
      print(t, { token: t });
    });
  token
    .command('revoke <id>')
    .description('revoke a token at once, on every protocol')
    .addOption(dataDirOption())
    .action(async (id: string, opts: { dataDir: string }) => {
      await revokeToken(opts.dataDir, parseId(id, 'token id'));
      print(`token ${id} revoked`, { id: Number(id), revoked: true });
    });
  token
    .command('list [owner]')
    .description('tokens (without their secrets)')
    .addOption(dataDirOption())
    .action(async (who: string | undefined, opts: { dataDir: string }) => {
      const tokens = await listTokens(opts.dataDir, who);
      print(
        tokens
          .map(
            (t) =>
              `${String(t.id).padStart(5)}  ${t.owner ?? '(service)'}  ${t.name}  ${t.created}` +
              `${t.revoked ? `  revoked ${t.revoked}` : ''}`,
          )
          .join('\n'),
        tokens,
      );
    });

  const key = program.command('key').description("owners' SSH public keys for SFTP (admin)");
  key
    .command('add <owner> <public-key-file>')
    .description("authorise an SSH public key (a .pub file, or '-' for standard input)")
    .option('--name <name>', "the key's name (default: its comment)")
    .addOption(dataDirOption())
    .action(async (who: string, file: string, opts: { dataDir: string; name?: string }) => {
      const text = file === '-' ? await readStdin() : await fs.readFile(file, 'utf8');
      const k = await addKey(opts.dataDir, who, text, opts.name);
      print(`key ${k.id} ${k.fingerprint} added for ${who}`, k);
    });
  key
    .command('remove <owner> <id>')
    .description('remove a key; sessions that logged in with it end at their next request')
    .addOption(dataDirOption())
    .action(async (who: string, id: string, opts: { dataDir: string }) => {
      await removeKey(opts.dataDir, who, parseId(id, 'key id'));
      print(`key ${id} removed`, { owner: who, id: Number(id), removed: true });
    });
  key
    .command('list [owner]')
    .description("SSH public keys (every owner's, or one owner's)")
    .addOption(dataDirOption())
    .action(async (who: string | undefined, opts: { dataDir: string }) => {
      const keys = await listKeys(opts.dataDir, who);
      print(
        keys
          .map((k) => `${String(k.id).padStart(5)}  ${k.owner}  ${k.algorithm}  ${k.fingerprint}  ${k.name}`)
          .join('\n'),
        keys,
      );
    });

  const admin = program.command('admin').description('the admin HTTP API (on the repository host)');
  const adminToken = admin.command('token').description('admin API tokens');
  adminToken
    .command('create <name>')
    .description('create a named admin token for /v1/admin/...; printed once')
    .addOption(dataDirOption())
    .action(async (name: string, opts: { dataDir: string }) => {
      const t = await withAdmin(opts.dataDir, (a) => a.createAdminToken(name));
      print(t.token, t);
    });
  adminToken
    .command('revoke <id>')
    .description('revoke an admin token at once')
    .addOption(dataDirOption())
    .action(async (id: string, opts: { dataDir: string }) => {
      await withAdmin(opts.dataDir, (a) => a.revokeAdminToken(parseId(id, 'admin token id')));
      print(`admin token ${id} revoked`, { id: Number(id), revoked: true });
    });
  adminToken
    .command('list')
    .description('admin tokens (without their secrets)')
    .addOption(dataDirOption())
    .action(async (opts: { dataDir: string }) => {
      const tokens = await withAdmin(opts.dataDir, (a) => a.listAdminTokens());
      print(
        tokens
          .map(
            (t) =>
              `${String(t.id).padStart(5)}  ${t.name}  ${t.created}${t.revoked ? `  revoked ${t.revoked}` : ''}`,
          )
          .join('\n'),
        tokens,
      );
    });

  const image = commandGroup(program, 'image', IMAGE_GROUP_DESCRIPTION);
  image
    .command('add-base <file>')
    .description("add a provider base image (checked as hosts check it); task specs name it 'base:<name>'")
    .requiredOption('--name <name>', 'the base image name, e.g. debian-12.qcow2')
    .addOption(dataDirOption())
    .action(async (file: string, opts: { dataDir: string; name: string }) => {
      const entry = await withBackend(opts.dataDir, (backend) =>
        addBaseImage(backend, opts.name, createReadStream(file, { highWaterMark: 1 << 20 })),
      );
      print(
        `${entry.name}  ${entry.format}  ${entry.virtualBytes} bytes virtual  sha256 ${entry.sha256}`,
        entry,
      );
    });
  image
    .command('remove-base <name>')
    .description('remove a provider base image (hosts keep cached copies for running tasks)')
    .addOption(dataDirOption())
    .action(async (name: string, opts: { dataDir: string }) => {
      await withBackend(opts.dataDir, (backend) => removeBaseImage(backend, name));
      print(`base image ${name} removed`, { name, removed: true });
    });

  commandGroup(program, 'repository', "the repository's storage (admin, on a repository host)")
    .command('migrate')
    .description(
      "bring the repository's schema to this version: the SQLite file on `local`; on `cluster` " +
        '(VSP_REPOSITORY_BACKEND=cluster) the PostgreSQL schema and the S3 bucket, before new servers start',
    )
    .addOption(dataDirOption())
    .action(async (opts: { dataDir: string }) => {
      const r = await migrateRepository(opts.dataDir, backendSettingsFromEnv(process.env));
      print(
        `${r.backend}: schema ${r.fromVersion} -> ${r.toVersion}` +
          (r.bucketCreated === undefined ? '' : r.bucketCreated ? ', bucket created' : ', bucket present'),
        r,
      );
    });

  const task = commandGroup(program, 'task', 'tasks');
  task
    .command('grant')
    .description(
      'admit a task for an owner (pre-flight, capability) and print the workflow input for ' +
        '`temporal workflow start --input` (operators only; audited)',
    )
    .requiredOption('--owner <name>', 'the owner the task runs for')
    .requiredOption('--spec <file>', "the task spec (JSON; '-' for standard input)")
    .option('--task-id <id>', 'the workflow id to start it under (default: generated, printed on stderr)')
    .addOption(dataDirOption())
    .action(async (opts: { owner: string; spec: string; taskId?: string; dataDir: string }) => {
      const text = opts.spec === '-' ? await readAll(process.stdin) : await fs.readFile(opts.spec, 'utf8');
      let spec: unknown;
      try {
        spec = JSON.parse(text);
      } catch (err) {
        throw new Error(`--spec ${opts.spec} is not JSON: ${(err as Error).message}`, { cause: err });
      }
      const granted = await grantTask(opts.dataDir, { owner: opts.owner, spec, taskId: opts.taskId });
      process.stderr.write(
        `task ${granted.taskId}: temporal workflow start --type TaskLifecycle --task-queue vsp ` +
          `--workflow-id ${JSON.stringify(granted.taskId)} --input "$(cat <this output>)"\n`,
      );
      process.stdout.write(`${JSON.stringify(granted.input)}\n`);
    });

  const codec = program
    .command('codec')
    .description(`the Temporal payload codec (${PAYLOAD_KEY_ENV}; operators)`);
  codec
    .command('serve')
    .description("serve the web UI's codec endpoint (decrypts payloads: operators' network only)")
    .option('--listen <host:port>', 'where to listen', '127.0.0.1:8081')
    .requiredOption('--ui-origin <url>', "the Temporal web UI's origin, e.g. http://127.0.0.1:8233")
    .action(async (opts: { listen: string; uiOrigin: string }) => {
      const payloadCodec = payloadCodecFromEnv();
      if (!payloadCodec) throw new Error(`${PAYLOAD_KEY_ENV} is not set: payloads are not encrypted`);
      const served = await startCodecServer(payloadCodec, {
        ...parseListen(opts.listen, '--listen'),
        origin: opts.uiOrigin,
      });
      print(`codec endpoint ${served.url} (key ${payloadCodec.keyId}) for ${opts.uiOrigin}`, {
        url: served.url,
        keyId: payloadCodec.keyId,
        uiOrigin: opts.uiOrigin,
      });
      // A server: it serves until SIGINT or SIGTERM (vsp exits once a command's action returns).
      await new Promise<void>((resolve) => {
        process.once('SIGINT', resolve);
        process.once('SIGTERM', resolve);
      });
      await served.close();
    });

  const password = program.command('password').description("owners' passwords for SFTP (admin)");
  password
    .command('set <owner>')
    .description('set the password, read from the first line of standard input (or --from-file)')
    .option('--from-file <file>', 'read the password from the first line of this file')
    .addOption(dataDirOption())
    .action(async (who: string, opts: { dataDir: string; fromFile?: string }) => {
      await setPassword(opts.dataDir, who, await readSecret(opts.fromFile ?? '-'));
      print(`password set for ${who}`, { owner: who, password: true });
    });
  password
    .command('clear <owner>')
    .description('remove the password: only keys and tokens log in')
    .addOption(dataDirOption())
    .action(async (who: string, opts: { dataDir: string }) => {
      await clearPassword(opts.dataDir, who);
      print(`password cleared for ${who}`, { owner: who, password: false });
    });
}
