import { promises as fs } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import path from 'node:path';
import { Server, utils, type AuthContext, type Connection } from 'ssh2';
import { describeError } from '../../logging/logger';
import { AccessDenied, authenticateKey, authenticatePassword, type OwnerSession } from '../accounts/auth';
import { remoteOf } from '../accounts/auditLog';
import { serveSftp, type SftpSessionDeps } from './sftpSession';
import { generateEd25519KeyPair } from '../../lib/sshKeyPair';

/**
 * The repository's SFTP service (ssh2's Server): owners log in with their password, an API token as
 * password, or an authorised SSH key, and get an SFTP subsystem confined to their own space. No
 * shell, exec or forwarding is offered (ssh2 refuses requests nobody listens for).
 */

export interface SftpServerOptions {
  host: string;
  /** 0 picks an ephemeral port. */
  port: number;
  /** OpenSSH-format private key; an ed25519 key is generated there on first start. */
  hostKeyFile: string;
  /** A connection that moves no bytes for this long is dropped, its open uploads discarded. */
  idleTimeoutMs: number;
}

export interface SftpServer {
  host: string;
  port: number;
  close(): Promise<void>;
}

/** On close, how long ended connections get to go away before the close returns anyway. */
const CLOSE_GRACE_MS = 5_000;

export function defaultHostKeyPath(dataDir: string): string {
  return path.join(dataDir, 'ssh_host_ed25519_key');
}

/** Reads the host key, or makes one (atomically, mode 0600) so clients see the same host every start. */
export async function loadOrCreateHostKey(file: string): Promise<Buffer> {
  try {
    return await fs.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT')
      throw new Error(`cannot read SSH host key ${file}`, { cause: err });
  }
  const pair = generateEd25519KeyPair('vsp-repository');
  const tmp = `${file}.tmp-${process.pid}`;
  const handle = await fs.open(tmp, 'wx', 0o600);
  try {
    await handle.writeFile(pair.private);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await fs.writeFile(`${file}.pub`, `${pair.public}\n`, { mode: 0o644 });
  await fs.rename(tmp, file);
  return Buffer.from(pair.private);
}

export async function startSftpServer(deps: SftpSessionDeps, opts: SftpServerOptions): Promise<SftpServer> {
  const { db, log, audit, loginThrottle } = deps;
  const hostKey = await loadOrCreateHostKey(opts.hostKeyFile);
  const connections = new Set<Connection>();

  const server = new Server({ hostKeys: [hostKey], ident: 'VSP-repository' }, (client, info) => {
    connections.add(client);
    const remote = remoteOf(info.ip, info.port);
    let session: OwnerSession | undefined;

    const denied = (ctx: AuthContext, err: unknown): void => {
      const detail = err instanceof Error ? err.message : String(err);
      audit.record({
        protocol: 'sftp',
        remote,
        user: ctx.username,
        action: 'login',
        result: 'denied',
        detail,
      });
      ctx.reject(['publickey', 'password']);
    };

    const loggedIn = (ctx: AuthContext, s: OwnerSession, how: string): void => {
      session = s;
      audit.record({ protocol: 'sftp', remote, user: s.owner, action: 'login', result: 'ok', detail: how });
      ctx.accept();
    };

    client.on('authentication', (ctx) => {
      const who = { address: info.ip, account: ctx.username };
      if (ctx.method === 'password') {
        loginThrottle
          .guard(who, () => authenticatePassword(db, ctx.username, ctx.password))
          .then(
            (s) => loggedIn(ctx, s, 'password'),
            (err: unknown) => denied(ctx, err),
          );
        return;
      }
      if (ctx.method !== 'publickey') return ctx.reject(['publickey', 'password']);
      const { signature } = ctx;
      loginThrottle
        .check(who)
        .then(async () => {
          // Without a signature the client only asks whether this key would do: no login, and no
          // guess either (public keys are public), so a refusal is not counted as a failure.
          if (!signature) {
            await authenticateKey(db, ctx.username, ctx.key.data);
            return ctx.accept();
          }
          const s = await loginThrottle.guard(who, async () => {
            const s = await authenticateKey(db, ctx.username, ctx.key.data);
            const key = utils.parseKey(ctx.key.data);
            if (
              key instanceof Error ||
              ctx.blob === undefined ||
              !key.verify(ctx.blob, signature, ctx.hashAlgo)
            )
              throw new AccessDenied(401, 'SSH key signature does not verify');
            return s;
          });
          loggedIn(ctx, s, 'publickey');
        })
        .catch((err: unknown) => denied(ctx, err));
    });

    client.on('ready', () => {
      client.on('session', (accept) => {
        accept().on('sftp', (acceptSftp) => {
          if (!session) return;
          serveSftp(acceptSftp(), session, remote, deps, () => client.end());
        });
      });
    });
    client.on('error', (err) => log.debug({ remote, err: describeError(err) }, 'SSH connection error'));
    client.on('close', () => connections.delete(client));
  });

  // SSH has no idle limit of its own: our listener gives each connection one before ssh2 takes it.
  const tcp = createServer((socket) => {
    socket.setTimeout(opts.idleTimeoutMs, () => socket.destroy());
    server.injectSocket(socket);
  });
  await new Promise<void>((resolve, reject) => {
    tcp.once('error', reject);
    tcp.listen(opts.port, opts.host, () => {
      tcp.off('error', reject);
      resolve();
    });
  });
  const addr = tcp.address() as AddressInfo;
  let closing: Promise<void> | undefined;
  const close = async (): Promise<void> => {
    const closed = new Promise<void>((resolve) => tcp.close(() => resolve()));
    // SFTP sessions are long-lived: ending them is the normal way to stop; open uploads are discarded.
    for (const c of connections) c.end();
    let timer: NodeJS.Timeout | undefined;
    const gaveUp = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(true), CLOSE_GRACE_MS);
    });
    if (await Promise.race([closed.then(() => false), gaveUp]))
      log.warn({ open: connections.size }, 'SFTP connections did not close in time');
    clearTimeout(timer);
  };
  return { host: addr.address, port: addr.port, close: () => (closing ??= close()) };
}
