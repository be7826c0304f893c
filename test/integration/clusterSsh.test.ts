import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { generateEd25519KeyPair } from '../../lib/sshKeyPair';
import { freePort } from '../../deploy/devcluster/ports';
import {
  HostKeyMismatchError,
  RemoteCommandError,
  SshSession,
  type SshTarget,
} from '../../deploy/cluster/sshSession';

/**
 * The deploy's SSH transport against a real OpenSSH server on loopback: host key pinning, key login,
 * commands with their status and output, standard input, streamed uploads, timeouts. sshd runs as root
 * (it logs in as root, as the deploy does), so the file skips without root.
 */

const asRoot = process.getuid?.() === 0;
const maybe = asRoot ? describe : describe.skip;

maybe('deploy SSH transport (OpenSSH on loopback)', () => {
  let dir: string;
  let sshd: ChildProcess;
  let target: SshTarget;
  let otherHostKey: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-sshd-'));
    const hostKey = generateEd25519KeyPair();
    const client = generateEd25519KeyPair();
    otherHostKey = generateEd25519KeyPair().public;
    await fs.writeFile(path.join(dir, 'host_key'), hostKey.private, { mode: 0o600 });
    await fs.writeFile(path.join(dir, 'authorized_keys'), `${client.public}\n`, { mode: 0o600 });
    const port = await freePort();
    await fs.writeFile(
      path.join(dir, 'sshd_config'),
      [
        `ListenAddress 127.0.0.1:${port}`,
        `HostKey ${dir}/host_key`,
        `AuthorizedKeysFile ${dir}/authorized_keys`,
        `PidFile ${dir}/sshd.pid`,
        'PermitRootLogin prohibit-password',
        'PasswordAuthentication no',
        'KbdInteractiveAuthentication no',
        'UsePAM no',
        'StrictModes no',
      ].join('\n') + '\n',
    );
    await fs.mkdir('/run/sshd', { recursive: true, mode: 0o755 });
    sshd = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', path.join(dir, 'sshd_config')], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    await new Promise<void>((resolve, reject) => {
      let log = '';
      sshd.stderr?.on('data', (d: Buffer) => {
        log += d.toString();
        if (log.includes('Server listening on')) resolve();
      });
      sshd.once('exit', (code) => reject(new Error(`sshd exited ${code}: ${log}`)));
    });
    target = {
      name: 'loop',
      address: '127.0.0.1',
      port,
      user: 'root',
      privateKey: Buffer.from(client.private),
      hostKey: hostKey.public,
    };
  });

  afterAll(async () => {
    if (sshd && sshd.exitCode === null) {
      const exited = new Promise((r) => sshd.once('exit', r));
      sshd.kill('SIGTERM');
      await exited;
    }
    if (dir) await fs.rm(dir, { recursive: true, force: true });
  });

  it('runs commands and reports their status, output and errors', async () => {
    const s = await SshSession.connect(target);
    try {
      expect(await s.exec('echo out; echo err >&2; exit 3')).toEqual({
        code: 3,
        signal: undefined,
        stdout: 'out\n',
        stderr: 'err\n',
      });
      expect(await s.run('id -u')).toBe('0\n');
      expect(await s.run('cat', { stdin: 'given on stdin' })).toBe('given on stdin');
      const failure = await s.run('echo "no such thing" >&2; exit 2').catch((e: unknown) => e);
      expect(failure).toBeInstanceOf(RemoteCommandError);
      expect((failure as Error).message).toBe(
        '\'echo "no such thing" >&2; exit 2\' on loop exited 2: no such thing',
      );
    } finally {
      s.close();
    }
  });

  it('streams a file to a command', async () => {
    const file = path.join(dir, 'payload');
    const bytes = randomBytes(3 * 1024 * 1024 + 17);
    await fs.writeFile(file, bytes);
    const s = await SshSession.connect(target);
    try {
      await s.upload(file, `cat > ${dir}/received`);
      const remote = (await s.run(`sha256sum ${dir}/received`)).split(' ')[0];
      expect(remote).toBe(createHash('sha256').update(bytes).digest('hex'));
      await expect(s.upload(file, 'cat > /nonexistent/dir/x')).rejects.toThrow(
        /exited 1: .*No such file or directory/,
      );
    } finally {
      s.close();
    }
  });

  it('gives up on a command that outlives its timeout', async () => {
    const s = await SshSession.connect(target);
    try {
      await expect(s.exec(`echo $$ > ${dir}/sleeper; exec sleep 600`, { timeoutMs: 300 })).rejects.toThrow(
        /^'echo \$\$ > \S+; exec sleep 600' on loop did not finish within 0 s$/,
      );
      // The remote command is not ours to leave behind.
      await s.run(`kill $(cat ${dir}/sleeper)`);
    } finally {
      s.close();
    }
  });

  it('refuses a host whose key is not the inventory’s, naming both fingerprints', async () => {
    const err = await SshSession.connect({ ...target, hostKey: otherHostKey }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(HostKeyMismatchError);
    expect((err as Error).message).toMatch(
      /^refusing loop \(root@127\.0\.0\.1:\d+\): its host key SHA256:\S+ is not the inventory's hostKey SHA256:\S+/,
    );
  });

  it('says why a login is refused', async () => {
    const stranger = Buffer.from(generateEd25519KeyPair().private);
    await expect(SshSession.connect({ ...target, privateKey: stranger })).rejects.toThrow(
      /^cannot connect to loop \(root@127\.0\.0\.1:\d+\): All configured authentication methods failed/,
    );
  });
});
