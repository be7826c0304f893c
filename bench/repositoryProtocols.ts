import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, existsSync, readFileSync, promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { descendantsOf, listProcesses } from '../deploy/devcluster/procTable';
import { addKey, addOwner, setPassword } from '../repository/accounts/admin';
import { describeError } from '../logging/logger';
import { RepositoryClient } from '../repository/client';
import type { BenchReport } from './report';
import {
  median,
  peakRssMiB,
  startServerProcess,
  stopServerProcess,
  timed,
  writeRandomFile,
} from './repository';

/**
 * One large file up and down through each of the repository's protocols, each beside a reference on
 * the same machine in the same run: HTTP (RepositoryClient) beside `cp` + sync, SFTP (OpenSSH `sftp`)
 * beside OpenSSH's own sshd, FTPS (curl, explicit TLS) beside vsftpd. VSP fsyncs every upload, so the
 * references are made to sync too; downloads are synced by the client on both sides.
 */

const run = promisify(execFile);
const OWNER = 'bench';
const SFTP_SERVER = '/usr/lib/openssh/sftp-server';
/** The reference servers and clients, and what makes their keys and certificates. */
const REFERENCE_TOOLS = [
  '/usr/sbin/sshd',
  SFTP_SERVER,
  '/usr/bin/sftp',
  '/usr/bin/ssh-keygen',
  '/usr/sbin/vsftpd',
  '/usr/bin/curl',
  '/usr/bin/openssl',
];

type Protocol = 'HTTP' | 'SFTP' | 'FTPS';
type Direction = 'upload' | 'download';

interface Measurement {
  seconds: number[];
  /** Peak summed RSS of the server's process tree during each transfer (MiB). */
  rssMiB: number[];
  /** Failed transfers (and downloads with wrong bytes): counted and reported, never retried. */
  errors: string[];
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => server.listen(0, '127.0.0.1', resolve).once('error', reject));
  const { port } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Waits until something accepts TCP connections on the port, failing early if `child` exits. */
async function waitForPort(
  port: number,
  child: ChildProcess,
  what: string,
  stderr: () => string,
): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}: ${stderr()}`);
    const up = await new Promise<boolean>((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => resolve(true));
      socket.once('error', () => resolve(false));
      socket.once('connect', () => socket.destroy());
    });
    if (up) return;
    await sleep(100);
  }
  throw new Error(`${what} did not listen on 127.0.0.1:${port} within 10 s: ${stderr()}`);
}

/** Starts a reference server in the foreground, keeping its stderr for error messages. */
async function startReference(
  what: string,
  command: string,
  args: string[],
  port: number,
): Promise<ChildProcess> {
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-4000);
  });
  const spawned = new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve);
    child.once('error', (err) => reject(new Error(`cannot start ${what} (${command})`, { cause: err })));
  });
  await spawned;
  try {
    await waitForPort(port, child, what, () => stderr);
  } catch (err) {
    await stopServerProcess(child);
    throw err;
  }
  return child;
}

function treeRssMiB(pid: number): number {
  let kB = 0;
  for (const p of [pid, ...descendantsOf(pid, listProcesses()).map((d) => d.pid)]) {
    try {
      const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${p}/status`, 'utf8'));
      kB += m ? Number(m[1]) : 0;
    } catch {
      // The process ended between listing and reading.
    }
  }
  return kB / 1024;
}

/** How a server's peak RSS during one transfer is taken. */
type RssProbe = { kind: 'none' } | { kind: 'process'; pid: number } | { kind: 'tree'; pid: number };

/**
 * Times `fn` and takes the server's peak RSS meanwhile. VSP is one process: its kernel high-water mark
 * is reset before (clear_refs 5) and read after, exact and free. sshd and vsftpd fork per session, so
 * their process tree's summed RSS is sampled every 50 ms instead (nothing else runs in this process
 * then: their clients are separate programs).
 */
async function measure(probe: RssProbe, into: Measurement, fn: () => Promise<unknown>): Promise<void> {
  let peak = 0;
  let sampler: NodeJS.Timeout | undefined;
  if (probe.kind === 'process') await fs.writeFile(`/proc/${probe.pid}/clear_refs`, '5');
  if (probe.kind === 'tree') {
    const pid = probe.pid;
    peak = treeRssMiB(pid);
    sampler = setInterval(() => (peak = Math.max(peak, treeRssMiB(pid))), 50);
  }
  try {
    into.seconds.push(await timed(fn));
  } finally {
    clearInterval(sampler);
  }
  if (probe.kind === 'process') peak = await peakRssMiB(probe.pid);
  into.rssMiB.push(peak);
}

async function sha256Of(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

const sh = (script: string, ...args: string[]): Promise<unknown> =>
  run('sh', ['-c', script, 'sh', ...args], { maxBuffer: 16 << 20 });

async function sshdConfig(dir: string, port: number, clientPublicKey: string): Promise<string> {
  const hostKey = path.join(dir, 'ssh_host_ed25519_key');
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', hostKey]);
  const authorizedKeys = path.join(dir, 'authorized_keys');
  await fs.writeFile(authorizedKeys, clientPublicKey, { mode: 0o600 });
  const conf = path.join(dir, 'sshd_config');
  await fs.writeFile(
    conf,
    [
      `ListenAddress 127.0.0.1:${port}`,
      `HostKey ${hostKey}`,
      `AuthorizedKeysFile ${authorizedKeys}`,
      'PermitRootLogin prohibit-password',
      'PasswordAuthentication no',
      'KbdInteractiveAuthentication no',
      'UsePAM no',
      'StrictModes no',
      'PidFile none',
      `Subsystem sftp ${SFTP_SERVER}`,
      '',
    ].join('\n'),
  );
  return conf;
}

/** Anonymous login (no system user or password needed) with uploads into `<root>/up`, TLS forced. */
async function vsftpdConfig(
  dir: string,
  port: number,
  pasv: number,
  cert: string,
  key: string,
): Promise<string> {
  const root = path.join(dir, 'ftproot');
  await fs.mkdir(path.join(root, 'up'), { recursive: true });
  await fs.chmod(root, 0o755);
  await run('chown', ['ftp:ftp', path.join(root, 'up')]);
  const conf = path.join(dir, 'vsftpd.conf');
  await fs.writeFile(
    conf,
    [
      'listen=YES',
      'listen_ipv6=NO',
      'listen_address=127.0.0.1',
      `listen_port=${port}`,
      'background=NO',
      'anonymous_enable=YES',
      'local_enable=NO',
      'no_anon_password=YES',
      'write_enable=YES',
      'anon_upload_enable=YES',
      'anon_other_write_enable=YES',
      'anon_umask=022',
      `anon_root=${root}`,
      'ftp_username=ftp',
      'pasv_enable=YES',
      `pasv_min_port=${pasv}`,
      `pasv_max_port=${pasv + 9}`,
      'ssl_enable=YES',
      'allow_anon_ssl=YES',
      'force_anon_logins_ssl=YES',
      'force_anon_data_ssl=YES',
      'require_ssl_reuse=NO',
      `rsa_cert_file=${cert}`,
      `rsa_private_key_file=${key}`,
      'secure_chroot_dir=/var/run/vsftpd/empty',
      'seccomp_sandbox=NO',
      'xferlog_enable=NO',
      '',
    ].join('\n'),
  );
  return conf;
}

export async function benchRepositoryProtocols(
  opts: { sizeMiB?: number; runs?: number } = {},
): Promise<BenchReport> {
  const sizeMiB = opts.sizeMiB ?? 1024;
  const runs = opts.runs ?? 3;
  const missing = REFERENCE_TOOLS.filter((tool) => !existsSync(tool));
  if (missing.length > 0) {
    throw new Error(
      `the protocols benchmark needs its reference tools, missing here: ${missing.join(', ')}; ` +
        '`npm run setup` installs them (apt-get install -y openssh-client openssh-server vsftpd curl openssl)',
    );
  }
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-bench-protocols-'));
  const children: ChildProcess[] = [];
  // sshd insists on its privilege-separation folder; made only if absent, and removed again then.
  const madePrivsepDir = !existsSync('/run/sshd');
  try {
    await fs.chmod(dir, 0o755);
    if (madePrivsepDir) await fs.mkdir('/run/sshd', { mode: 0o755 });
    const src = path.join(dir, 'source.bin');
    const dst = path.join(dir, 'download.bin');
    const sha256 = await writeRandomFile(src, sizeMiB * 1024 * 1024);

    const clientKey = path.join(dir, 'client_key');
    await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', clientKey]);
    const clientPublicKey = await fs.readFile(`${clientKey}.pub`, 'utf8');
    const cert = path.join(dir, 'ftps_cert.pem');
    const key = path.join(dir, 'ftps_key.pem');
    await run('openssl', [
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-days',
      '1',
      '-subj',
      '/CN=127.0.0.1',
      '-keyout',
      key,
      '-out',
      cert,
    ]);

    // VSP: one server process with all three protocols.
    const dataDir = path.join(dir, 'data');
    const { token } = await addOwner(dataDir, OWNER);
    const password = randomBytes(18).toString('base64url');
    await setPassword(dataDir, OWNER, password);
    await addKey(dataDir, OWNER, clientPublicKey.trim(), 'bench');
    const [vspSftpPort, vspFtpsPort] = [await freePort(), await freePort()];
    // Passive ports above the kernel's ephemeral range (32768-60999), so no outgoing connection or
    // port-0 listener of another program holds them; 10 for VSP, the next 10 for vsftpd.
    const vspPasv = 61000 + (process.pid % 450) * 10;
    const vsp = await startServerProcess(dataDir, randomBytes(32).toString('base64url'), {
      VSP_REPO_SFTP_LISTEN: `127.0.0.1:${vspSftpPort}`,
      VSP_REPO_FTPS_LISTEN: `127.0.0.1:${vspFtpsPort}`,
      VSP_REPO_FTPS_PASV_PORTS: `${vspPasv}-${vspPasv + 9}`,
      VSP_REPO_FTPS_CERT: cert,
      VSP_REPO_FTPS_KEY: key,
    });
    children.push(vsp.child);
    await waitForPort(vspFtpsPort, vsp.child, 'repository FTPS', () => '');
    const client = new RepositoryClient({ url: vsp.url, token });

    // References.
    const sshdPort = await freePort();
    const sshd = await startReference(
      'sshd',
      '/usr/sbin/sshd',
      ['-D', '-e', '-f', await sshdConfig(dir, sshdPort, clientPublicKey)],
      sshdPort,
    );
    children.push(sshd);
    const sshdFiles = path.join(dir, 'sshd-files');
    await fs.mkdir(sshdFiles);
    const ftpPort = await freePort();
    const vsftpd = await startReference(
      'vsftpd',
      '/usr/sbin/vsftpd',
      [await vsftpdConfig(dir, ftpPort, vspPasv + 10, cert, key)],
      ftpPort,
    );
    children.push(vsftpd);

    const sftp = async (user: string, port: number, command: string): Promise<void> => {
      const batch = path.join(dir, 'sftp.batch');
      await fs.writeFile(batch, `${command}\n`);
      await run('sftp', [
        '-q',
        '-b',
        batch,
        '-i',
        clientKey,
        '-P',
        String(port),
        '-o',
        'BatchMode=yes',
        '-o',
        'IdentitiesOnly=yes',
        '-o',
        'StrictHostKeyChecking=no',
        '-o',
        'UserKnownHostsFile=/dev/null',
        `${user}@127.0.0.1`,
      ]);
    };
    const curlTls = ['-sS', '--ssl-reqd', '--insecure', '--ftp-pasv'];
    const vspFtp = `ftp://127.0.0.1:${vspFtpsPort}/big.bin`;
    const refFtp = `ftp://127.0.0.1:${ftpPort}/up/big.bin`;
    const vspLogin = ['--user', `${OWNER}:${password}`];

    const curlDownload = async (...args: string[]): Promise<void> => {
      await run('curl', [...curlTls, '-o', dst, ...args]);
      await run('sync', [dst]);
    };
    /** Per protocol and direction: the VSP transfer and its reference. */
    const plan: Record<
      Protocol,
      Record<Direction, { vsp: () => Promise<unknown>; ref: () => Promise<unknown> }>
    > = {
      HTTP: {
        upload: {
          vsp: () => client.upload(OWNER, 'big.bin', src, { sha256 }),
          ref: () => sh('cp "$1" "$2" && sync "$2"', src, path.join(sshdFiles, 'cp.bin')),
        },
        download: {
          vsp: () => client.download(OWNER, 'big.bin', dst),
          ref: () => sh('cp "$1" "$2" && sync "$2"', path.join(sshdFiles, 'cp.bin'), dst),
        },
      },
      SFTP: {
        upload: {
          // VSP's server fsyncs every upload by itself; OpenSSH's does on `put -f`.
          vsp: () => sftp(OWNER, vspSftpPort, `put ${src} /big.bin`),
          ref: () => sftp('root', sshdPort, `put -f ${src} ${sshdFiles}/big.bin`),
        },
        download: {
          vsp: () => sftp(OWNER, vspSftpPort, `get -f /big.bin ${dst}`),
          ref: () => sftp('root', sshdPort, `get -f ${sshdFiles}/big.bin ${dst}`),
        },
      },
      FTPS: {
        upload: {
          vsp: () => run('curl', [...curlTls, ...vspLogin, '-T', src, vspFtp]),
          ref: async () => {
            await run('curl', [...curlTls, '-T', src, refFtp]);
            await run('sync', [path.join(dir, 'ftproot/up/big.bin')]);
          },
        },
        download: {
          vsp: () => curlDownload(...vspLogin, vspFtp),
          ref: () => curlDownload(refFtp),
        },
      },
    };
    const vspProbe: RssProbe = { kind: 'process', pid: vsp.child.pid! };
    const refProbe: Record<Protocol, RssProbe> = {
      HTTP: { kind: 'none' },
      SFTP: { kind: 'tree', pid: sshd.pid! },
      FTPS: { kind: 'tree', pid: vsftpd.pid! },
    };
    const results = new Map<string, Measurement>();
    const slot = (key: string): Measurement => {
      if (!results.has(key)) results.set(key, { seconds: [], rssMiB: [], errors: [] });
      return results.get(key)!;
    };

    for (let i = 0; i < runs; i++) {
      for (const protocol of ['HTTP', 'SFTP', 'FTPS'] as const) {
        for (const direction of ['upload', 'download'] as const) {
          for (const side of ['vsp', 'ref'] as const) {
            const probe = side === 'vsp' ? vspProbe : refProbe[protocol];
            const into = slot(`${protocol} ${direction} ${side}`);
            try {
              await measure(probe, into, plan[protocol][direction][side]);
              if (direction === 'download') {
                const got = await sha256Of(dst);
                if (got !== sha256) throw new Error('the download returned different bytes');
              }
            } catch (err) {
              into.seconds.pop();
              into.errors.push(describeError(err));
            }
            await fs.rm(dst, { force: true });
          }
        }
      }
    }

    const round = (x: number, digits: number): number => Math.round(x * 10 ** digits) / 10 ** digits;
    const rate = (m: Measurement): number | string =>
      m.seconds.length > 0 ? round(sizeMiB / median(m.seconds), 1) : 'failed';
    const peak = (m: Measurement): number => Math.round(Math.max(0, ...m.rssMiB));
    const reference: Record<Protocol, string> = {
      HTTP: 'cp + sync',
      SFTP: 'OpenSSH sshd + sftp-server',
      FTPS: 'vsftpd (explicit TLS)',
    };
    const vspClient: Record<Protocol, string> = {
      HTTP: 'RepositoryClient',
      SFTP: 'OpenSSH sftp -b',
      FTPS: 'curl --ssl-reqd',
    };
    const rows: BenchReport['rows'] = [];
    const summary: BenchReport['summary'] = {};
    for (const protocol of ['HTTP', 'SFTP', 'FTPS'] as const) {
      for (const direction of ['upload', 'download'] as const) {
        const v = slot(`${protocol} ${direction} vsp`);
        const r = slot(`${protocol} ${direction} ref`);
        const ratio =
          v.seconds.length > 0 && r.seconds.length > 0
            ? round(median(r.seconds) / median(v.seconds), 2)
            : 'n/a';
        rows.push({
          protocol,
          direction,
          'VSP client': vspClient[protocol],
          reference: reference[protocol],
          'VSP MiB/s': rate(v),
          'reference MiB/s': rate(r),
          'VSP speed / reference': ratio,
          'VSP server peak RSS (MiB)': peak(v),
          'reference server peak RSS (MiB)': protocol === 'HTTP' ? 'n/a' : peak(r),
          'VSP failures': v.errors.length,
          'reference failures': r.errors.length,
        });
        for (const [side, m] of [
          ['VSP', v],
          ['reference', r],
        ] as const) {
          if (m.errors.length > 0) summary[`${protocol} ${direction} ${side}: first failure`] = m.errors[0];
        }
        summary[`${protocol} ${direction}: VSP / reference speed`] = ratio;
      }
    }
    summary['VSP server peak RSS (MiB), all transfers'] = Math.max(
      ...[...results.entries()].filter(([k]) => k.endsWith(' vsp')).map(([, m]) => peak(m)),
    );
    return {
      name: 'protocols',
      title: `Repository protocols: ${sizeMiB} MiB upload and download over HTTP, SFTP and FTPS vs references`,
      method:
        `One ${sizeMiB} MiB random file, ${runs} run(s), medians of the successful transfers; every download is ` +
        'checked by SHA-256 outside the timing; failed transfers are counted, not retried. VSP: one ' +
        'repository server process (node dist/repository/main.js) serving HTTP, SFTP and FTPS on 127.0.0.1; ' +
        'HTTP through RepositoryClient (hashes and fsyncs), SFTP through OpenSSH ' +
        "`sftp -b` with a key added by the admin API (VSP's server fsyncs each upload itself), FTPS through " +
        '`curl --ssl-reqd` (explicit TLS, passive) with the owner password. References on the same machine, ' +
        'interleaved with VSP in the same run: `cp` + `sync FILE` for HTTP; OpenSSH sshd (foreground, temp ' +
        'host key, /usr/lib/openssh/sftp-server) with `put -f` (fsync@openssh.com) for SFTP; vsftpd ' +
        '(anonymous login, forced TLS, passive ports, self-signed cert) with curl then `sync FILE` for FTPS. ' +
        'Downloads are `get -f` / curl + `sync FILE` on both sides. Default ciphers on both sides. Peak server ' +
        "RSS per transfer: for VSP's single process the kernel's VmHWM, reset before each transfer through " +
        '/proc/<pid>/clear_refs; for sshd and vsftpd (which fork per session) the largest sum of VmRSS over ' +
        "the server's process tree, sampled every 50 ms. The largest over the runs is shown.",
      rows,
      summary,
    };
  } finally {
    for (const child of children.reverse()) await stopServerProcess(child);
    if (madePrivsepDir) await fs.rm('/run/sshd', { recursive: true, force: true });
    await fs.rm(dir, { recursive: true, force: true });
  }
}
