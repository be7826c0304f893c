import { Client } from 'ssh2';

/** One host to reach over ssh: key authentication, and the host key it must present. */
export interface SshTarget {
  address: string;
  port?: number;
  user: string;
  privateKey: Buffer | string;
  /** The host's public key line, 'ssh-ed25519 AAAA...': any other key fails the connection. */
  hostKey: string;
}

export interface SshResult {
  /** Exit code, or null when a signal ended the command. */
  code: number | null;
  signal?: string;
  stdout: string;
  stderr: string;
}

/** Accepts exactly the key of `hostKeyLine` (ssh2 hands the verifier the raw key blob). */
export function hostKeyVerifier(hostKeyLine: string): (key: Buffer) => boolean {
  const blob = hostKeyLine.trim().split(/\s+/)[1];
  if (!blob) throw new Error(`host key ${JSON.stringify(hostKeyLine)} is not a public key line`);
  const expected = Buffer.from(blob, 'base64');
  return (key: Buffer) => key.equals(expected);
}

/** Opens an authenticated connection (host key checked); the caller ends it. */
export function sshConnect(t: SshTarget, timeoutMs = 20_000): Promise<Client> {
  const conn = new Client();
  return new Promise((resolve, reject) => {
    conn
      .once('ready', () => resolve(conn))
      .once('error', (err) => {
        conn.end();
        reject(new Error(`ssh ${t.user}@${t.address}: ${err.message}`, { cause: err }));
      })
      .connect({
        host: t.address,
        port: t.port ?? 22,
        username: t.user,
        privateKey: t.privateKey,
        hostVerifier: hostKeyVerifier(t.hostKey),
        readyTimeout: timeoutMs,
        // A host that dies (a fault test powers one off) closes the connection within ~30 s.
        keepaliveInterval: 5000,
        keepaliveCountMax: 6,
      });
  });
}

/**
 * Runs one shell command on an open connection and collects its output; rejects only when the command
 * cannot run or outlives `timeoutMs` (a non-zero exit is a result).
 */
export function sshRun(
  conn: Client,
  command: string,
  opts: { timeoutMs?: number; input?: string | Buffer } = {},
): Promise<SshResult> {
  const timeoutMs = opts.timeoutMs ?? 120_000;
  return new Promise((resolve, reject) => {
    conn.exec(command, (err, stream) => {
      if (err)
        return reject(new Error(`ssh exec ${JSON.stringify(command)}: ${err.message}`, { cause: err }));
      const out: Buffer[] = [];
      const errOut: Buffer[] = [];
      const timer = setTimeout(() => {
        stream.close();
        reject(new Error(`ssh exec ${JSON.stringify(command)}: no exit after ${timeoutMs} ms`));
      }, timeoutMs);
      stream.on('data', (d: Buffer) => out.push(d));
      stream.stderr.on('data', (d: Buffer) => errOut.push(d));
      stream.once('close', (code: number | null | undefined, signal?: string) => {
        clearTimeout(timer);
        if (code == null && !signal)
          return reject(new Error(`ssh exec ${JSON.stringify(command)}: connection lost before it exited`));
        resolve({
          code: code ?? null,
          ...(signal ? { signal } : {}),
          stdout: Buffer.concat(out).toString('utf8'),
          stderr: Buffer.concat(errOut).toString('utf8'),
        });
      });
      if (opts.input !== undefined) stream.end(opts.input);
      else stream.end();
    });
  });
}

/** Connects, runs one command, disconnects. */
export async function sshExec(
  t: SshTarget,
  command: string,
  opts: { timeoutMs?: number; input?: string | Buffer } = {},
): Promise<SshResult> {
  const conn = await sshConnect(t);
  try {
    return await sshRun(conn, command, opts);
  } finally {
    conn.end();
  }
}

/** A command's stdout; a non-zero exit is an error that carries its stderr. */
export function okOutput(where: string, command: string, r: SshResult): string {
  if (r.code !== 0)
    throw new Error(
      `${where}: ${JSON.stringify(command)} exited with ${r.code ?? r.signal}: ${r.stderr.trim() || r.stdout.trim()}`,
    );
  return r.stdout;
}
