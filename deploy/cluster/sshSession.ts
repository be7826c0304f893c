import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import { Client, utils, type ClientChannel } from 'ssh2';

/**
 * One SSH connection to a cluster host (ssh2), authenticated with a key and trusting only the host key
 * the inventory records: anything else is refused before a byte of ours is sent. Commands run through
 * the remote shell; their output is collected, bounded by a timeout.
 */

export interface SshTarget {
  /** The host's name, for messages. */
  name: string;
  address: string;
  port: number;
  user: string;
  privateKey: Buffer;
  /** The host's public key line, `ssh-ed25519 AAAA...`. */
  hostKey: string;
  readyTimeoutMs?: number;
}

export interface ExecResult {
  code: number | null;
  signal?: string;
  stdout: string;
  stderr: string;
}

export interface ExecOptions {
  /** Sent to the command's standard input, then closed. */
  stdin?: string | Buffer;
  timeoutMs?: number;
}

/** A command that exited with another status than 0: its stderr (tail) is the cause. */
export class RemoteCommandError extends Error {
  constructor(
    readonly host: string,
    readonly command: string,
    readonly result: ExecResult,
  ) {
    const why = (result.stderr.trim() || result.stdout.trim()).split('\n').slice(-6).join(' | ');
    super(
      `${what(command)} on ${host} ${result.code === null ? `was killed (${result.signal ?? 'no status'})` : `exited ${result.code}`}${why ? `: ${why}` : ''}`,
    );
  }
}

export class HostKeyMismatchError extends Error {}

const DEFAULT_TIMEOUT_MS = 120_000;
const MAX_OUTPUT = 4 * 1024 * 1024;

/** `SHA256:...` as `ssh-keygen -lf` prints it. */
export function fingerprint(keyBlob: Buffer): string {
  return `SHA256:${createHash('sha256').update(keyBlob).digest('base64').replace(/=+$/, '')}`;
}

/** The key type and its wire blob of a public key line. */
export function parsePublicKeyLine(line: string): { type: string; blob: Buffer } {
  const parsed = utils.parseKey(line.trim());
  const key = Array.isArray(parsed) ? parsed[0] : parsed;
  if (key instanceof Error) throw new Error(`not a public key line: ${key.message}`);
  return { type: key.type, blob: key.getPublicSSH() };
}

/** Host key algorithms that make the server present a key of this type (RSA signs with SHA-2 today). */
function hostKeyAlgorithms(type: string): string[] {
  return type === 'ssh-rsa' ? ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'] : [type];
}

export class SshSession {
  private constructor(
    readonly target: SshTarget,
    private readonly client: Client,
  ) {}

  static connect(target: SshTarget): Promise<SshSession> {
    const expected = parsePublicKeyLine(target.hostKey);
    const client = new Client();
    let mismatch: string | undefined;
    return new Promise((resolve, reject) => {
      client
        .once('ready', () => resolve(new SshSession(target, client)))
        .once('error', (err) => {
          client.end();
          const where = `${target.name} (${target.user}@${target.address}:${target.port})`;
          reject(
            mismatch
              ? new HostKeyMismatchError(`refusing ${where}: ${mismatch}`, { cause: err })
              : new Error(`cannot connect to ${where}: ${err.message}`, { cause: err }),
          );
        })
        .connect({
          host: target.address,
          port: target.port,
          username: target.user,
          privateKey: target.privateKey,
          readyTimeout: target.readyTimeoutMs ?? 20_000,
          keepaliveInterval: 10_000,
          keepaliveCountMax: 3,
          algorithms: { serverHostKey: hostKeyAlgorithms(expected.type) as never },
          hostVerifier: (key: Buffer) => {
            if (key.equals(expected.blob)) return true;
            mismatch =
              `its host key ${fingerprint(key)} is not the inventory's hostKey ${fingerprint(expected.blob)} ` +
              '(a different machine at that address, or a reinstalled host: check it, then update the inventory)';
            return false;
          },
        });
    });
  }

  /** Runs a command through the remote shell; never throws for a non-zero status. */
  exec(command: string, opts: ExecOptions = {}): Promise<ExecResult> {
    return new Promise((resolve, reject) => {
      this.client.exec(command, (err, channel) => {
        if (err) {
          reject(
            new Error(`cannot start ${what(command)} on ${this.target.name}: ${err.message}`, { cause: err }),
          );
          return;
        }
        collect(channel, command, this.target.name, opts).then(resolve, reject);
        if (opts.stdin !== undefined) channel.end(opts.stdin);
        else channel.end();
      });
    });
  }

  /** Runs a command and returns its stdout; a non-zero status is a RemoteCommandError. */
  async run(command: string, opts: ExecOptions = {}): Promise<string> {
    const r = await this.exec(command, opts);
    if (r.code !== 0) throw new RemoteCommandError(this.target.name, command, r);
    return r.stdout;
  }

  /**
   * Streams a local file to the standard input of `command` (e.g. `cat > /tmp/x`), without holding it
   * in memory; throws if the command fails.
   */
  async upload(localFile: string, command: string, timeoutMs = 30 * 60_000): Promise<void> {
    const channel = await new Promise<ClientChannel>((resolve, reject) =>
      this.client.exec(command, (err, ch) => (err ? reject(err) : resolve(ch))),
    );
    const done = collect(channel, command, this.target.name, { timeoutMs });
    let sendError: unknown;
    await pipeline(createReadStream(localFile), channel).catch((err: unknown) => {
      sendError = err;
      channel.close();
    });
    const r = await done;
    // A command that failed early (no space, no folder) breaks the stream: its own error says why.
    if (r.code !== 0) throw new RemoteCommandError(this.target.name, command, r);
    if (sendError) throw new Error(`cannot send ${localFile} to ${this.target.name}`, { cause: sendError });
  }

  close(): void {
    this.client.end();
  }
}

function collect(
  channel: ClientChannel,
  command: string,
  host: string,
  opts: ExecOptions,
): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let size = 0;
    const keep = (into: Buffer[]) => (chunk: Buffer) => {
      size += chunk.length;
      if (size <= MAX_OUTPUT) into.push(chunk);
    };
    channel.on('data', keep(out));
    channel.stderr.on('data', keep(err));
    let code: number | null = null;
    let signal: string | undefined;
    channel.on('exit', (c: number | null, s?: string) => {
      code = c;
      signal = s;
    });
    const timer = setTimeout(() => {
      channel.close();
      reject(
        new Error(
          `${what(command)} on ${host} did not finish within ${Math.round((opts.timeoutMs ?? DEFAULT_TIMEOUT_MS) / 1000)} s`,
        ),
      );
    }, opts.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    channel.on('close', () => {
      clearTimeout(timer);
      resolve({
        code,
        signal,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
      });
    });
  });
}

/** The start of a command, for messages (scripts can be long). */
function what(command: string): string {
  const first = command.trim().split('\n')[0];
  return `'${first.length > 80 ? `${first.slice(0, 77)}...` : first}'`;
}
