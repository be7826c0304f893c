import { execFile } from 'node:child_process';
import { createHash, randomBytes, randomInt } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { addKey, addOwner, setPassword } from '../../repository/accounts/admin';
import { RepositoryClient } from '../../repository/client';
import { generateEd25519KeyPair } from '../../lib/sshKeyPair';
import type { RepositoryServer } from '../../repository/server';
import { startAllProtocols } from '../support/repositoryServer';

/**
 * Issue 14 item 8: the repository driven by real, widely used clients from Debian's packages (deploy/
 * setup.sh installs them): curl (HTTP, FTPS), lftp (FTPS), OpenSSH's sftp in batch mode, Python's
 * ftplib.FTP_TLS and paramiko (Debian's python3), rclone (SFTP and FTP backends). Each client uploads,
 * downloads (checksum compared), lists, renames and deletes, and resumes a download where it can, in a
 * folder of its own; what it did is checked over the repository's own HTTP API. Host key and TLS
 * certificate are pinned wherever the client allows.
 */

const run = promisify(execFile);
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const PASSWORD = 'correct horse battery staple';
/** Debian's interpreter, where python3-paramiko is installed (not a pyenv one that may be first on PATH). */
const PYTHON = '/usr/bin/python3';

let dataDir: string;
let scratch: string;
let server: RepositoryServer;
let token: string;
let http: RepositoryClient;
let ports: { http: number; sftp: number; ftps: number };
let files: { cert: string; key: string; knownHosts: string; py: string };

/** Runs a client; its output is returned, and its stderr is part of the error if it fails. */
async function sh(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<string> {
  try {
    const { stdout } = await run(cmd, args, {
      env: { ...process.env, HOME: scratch, ...env },
      timeout: 60_000,
      maxBuffer: 16 << 20,
    });
    return stdout;
  } catch (err) {
    const e = err as Error & { stderr?: string; stdout?: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${e.message}\n${e.stdout ?? ''}\n${e.stderr ?? ''}`, {
      cause: err,
    });
  }
}

/** What each client is driven through; `resume` fetches a file of which `local` already holds the start. */
interface ClientDriver {
  name: string;
  upload(local: string, remote: string): Promise<unknown>;
  download(remote: string, local: string): Promise<unknown>;
  /** The names in a folder. */
  list(folder: string): Promise<string[]>;
  /** Absent where the protocol has none (HTTP). */
  rename?(from: string, to: string): Promise<unknown>;
  remove(remote: string): Promise<unknown>;
  resume?(remote: string, local: string): Promise<unknown>;
  /** Why a client without `resume` has none. */
  noResume?: string;
}

const names = (text: string): string[] =>
  text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '');

/** The last field of `ls -l`-style lines (names here have no spaces). */
const longNames = (text: string): string[] => names(text).map((l) => l.split(/\s+/).pop() ?? '');

const ftpUrl = (p: string): string => `ftp://127.0.0.1:${ports.ftps}/${p}`;
const httpUrl = (p: string): string => `http://127.0.0.1:${ports.http}/v1/owners/alice/files/${p}`;
const curlFtps = (...args: string[]): Promise<string> =>
  sh('curl', ['-sS', '--ssl-reqd', '--cacert', files.cert, '-k', '--user', `alice:${PASSWORD}`, ...args]);
const curlHttp = (...args: string[]): Promise<string> =>
  sh('curl', ['-sS', '--fail-with-body', '-H', `Authorization: Bearer ${token}`, ...args]);

function lftp(...commands: string[]): Promise<string> {
  const quoted = PASSWORD.replace(/ /g, '\\ ');
  return sh('lftp', [
    '-c',
    [
      'set cmd:fail-exit true',
      'set ftp:ssl-force true',
      'set ftp:ssl-protect-data true',
      `set ssl:ca-file ${files.cert}`,
      // The self-signed certificate names the service, not 127.0.0.1: pinned by the CA file, not the name.
      'set ssl:check-hostname false',
      `open -u alice,${quoted} -p ${ports.ftps} ftp://127.0.0.1`,
      ...commands,
    ].join('; '),
  ]);
}

let batches = 0;
async function openSsh(...commands: string[]): Promise<string> {
  const batch = path.join(scratch, `sftp-batch-${++batches}`);
  await fs.writeFile(batch, `${commands.join('\n')}\n`);
  return sh('sftp', [
    '-b',
    batch,
    '-P',
    String(ports.sftp),
    '-i',
    path.join(scratch, 'id_ed25519'),
    '-o',
    `UserKnownHostsFile=${files.knownHosts}`,
    '-o',
    'StrictHostKeyChecking=yes',
    '-o',
    'BatchMode=yes',
    'alice@127.0.0.1',
  ]);
}

/** ftplib and paramiko, through one script (written in beforeAll) that takes the client, the action and paths. */
const python = (client: 'ftplib' | 'paramiko', ...args: string[]): Promise<string> =>
  sh(PYTHON, [files.py, client, ...args], {
    VSP_PORT: String(client === 'ftplib' ? ports.ftps : ports.sftp),
    VSP_PASSWORD: PASSWORD,
    VSP_CERT: files.cert,
    VSP_KEY: path.join(scratch, 'id_ed25519'),
    VSP_KNOWN_HOSTS: files.knownHosts,
  });

const rclone = (remote: 'sftp' | 'ftp', ...args: string[]): Promise<string> =>
  sh(
    'rclone',
    ['--config', '/dev/null', '--retries', '1', '--low-level-retries', '1', ...args],
    rcloneEnv(remote),
  );
let rcloneEnv: (remote: 'sftp' | 'ftp') => NodeJS.ProcessEnv;

const rcloneDriver = (remote: 'sftp' | 'ftp'): ClientDriver => ({
  name: `rclone ${remote}`,
  upload: (local, p) => rclone(remote, 'copyto', local, `vsp:${p}`),
  download: (p, local) => rclone(remote, 'copyto', `vsp:${p}`, local),
  list: async (dir) => names(await rclone(remote, 'lsf', `vsp:${dir}`)),
  rename: (from, to) => rclone(remote, 'moveto', `vsp:${from}`, `vsp:${to}`),
  remove: (p) => rclone(remote, 'deletefile', `vsp:${p}`),
  noResume: 'rclone copies a file whole; it has no resume of a partial local file',
});

const pythonDriver = (client: 'ftplib' | 'paramiko'): ClientDriver => ({
  name: client === 'ftplib' ? 'Python ftplib.FTP_TLS' : 'Python paramiko',
  upload: (local, p) => python(client, 'put', local, p),
  download: (p, local) => python(client, 'get', p, local),
  list: async (dir) => names(await python(client, 'ls', dir)),
  rename: (from, to) => python(client, 'mv', from, to),
  remove: (p) => python(client, 'rm', p),
  resume: (p, local) => python(client, 'resume', p, local),
});

const CLIENTS: ClientDriver[] = [
  {
    name: 'curl http',
    upload: (local, p) => curlHttp('-T', local, httpUrl(p)),
    download: (p, local) => curlHttp('-o', local, httpUrl(p)),
    list: async (dir) => {
      const out = JSON.parse(
        await curlHttp(`http://127.0.0.1:${ports.http}/v1/owners/alice/files?prefix=${dir}/`),
      ) as { files: { path: string }[] };
      return out.files.map((f) => f.path.slice(dir.length + 1));
    },
    remove: (p) => curlHttp('-X', 'DELETE', httpUrl(p)),
    resume: (p, local) => curlHttp('-C', '-', '-o', local, httpUrl(p)),
  },
  {
    name: 'curl ftps',
    upload: (local, p) => curlFtps('--ftp-create-dirs', '-T', local, ftpUrl(p)),
    download: (p, local) => curlFtps('-o', local, ftpUrl(p)),
    list: async (dir) => names(await curlFtps('--list-only', ftpUrl(`${dir}/`))),
    rename: (from, to) => curlFtps('-Q', `RNFR ${from}`, '-Q', `RNTO ${to}`, ftpUrl(''), '-o', '/dev/null'),
    remove: (p) => curlFtps('-Q', `DELE ${p}`, ftpUrl(''), '-o', '/dev/null'),
    resume: (p, local) => curlFtps('-C', '-', '-o', local, ftpUrl(p)),
  },
  {
    name: 'lftp',
    upload: (local, p) => lftp(`mkdir -p -f ${path.posix.dirname(p)}`, `put ${local} -o ${p}`),
    download: (p, local) => lftp(`get ${p} -o ${local}`),
    list: async (dir) => longNames(await lftp(`ls ${dir}`)),
    rename: (from, to) => lftp(`mv ${from} ${to}`),
    remove: (p) => lftp(`rm ${p}`),
    resume: (p, local) => lftp(`get -c ${p} -o ${local}`),
  },
  {
    name: 'OpenSSH sftp',
    upload: (local, p) => openSsh(`-mkdir ${path.posix.dirname(p)}`, `put ${local} ${p}`),
    download: (p, local) => openSsh(`get ${p} ${local}`),
    list: async (dir) =>
      names(await openSsh(`ls -1 ${dir}`))
        .filter((l) => !l.startsWith('sftp>'))
        .map((l) => path.posix.basename(l)),
    rename: (from, to) => openSsh(`rename ${from} ${to}`),
    remove: (p) => openSsh(`rm ${p}`),
    resume: (p, local) => openSsh(`reget ${p} ${local}`),
  },
  pythonDriver('ftplib'),
  pythonDriver('paramiko'),
  rcloneDriver('sftp'),
  rcloneDriver('ftp'),
];

const PY_SCRIPT = String.raw`
import ftplib, os, ssl, sys
client, action, *args = sys.argv[1:]
env = os.environ

class Ftp:
    error = ftplib.error_perm
    def __init__(self):
        ctx = ssl.create_default_context(cafile=env['VSP_CERT'])
        ctx.check_hostname = False  # the self-signed certificate names the service; it is pinned as the CA
        self.f = ftplib.FTP_TLS(context=ctx, timeout=30)
        self.f.connect('127.0.0.1', int(env['VSP_PORT']))
        self.f.login('alice', env['VSP_PASSWORD'])
        self.f.prot_p()
    def mkdir(self, d): self.f.mkd(d)
    def put(self, local, remote):
        with open(local, 'rb') as src:
            self.f.storbinary('STOR ' + remote, src)
    def get(self, remote, local, offset=0):
        with open(local, 'ab' if offset else 'wb') as dst:
            self.f.retrbinary('RETR ' + remote, dst.write, rest=offset or None)
    def ls(self, d): return [os.path.basename(n) for n in self.f.nlst(d)]
    def mv(self, a, b): self.f.rename(a, b)
    def rm(self, p): self.f.delete(p)
    def close(self): self.f.quit()

class Sftp:
    error = OSError
    def __init__(self):
        import paramiko
        c = paramiko.SSHClient()
        c.load_host_keys(env['VSP_KNOWN_HOSTS'])
        c.set_missing_host_key_policy(paramiko.RejectPolicy())
        c.connect('127.0.0.1', port=int(env['VSP_PORT']), username='alice', key_filename=env['VSP_KEY'],
                  allow_agent=False, look_for_keys=False, timeout=30)
        self.s = c.open_sftp()
    def mkdir(self, d): self.s.mkdir(d)
    def put(self, local, remote): self.s.put(local, remote)
    def get(self, remote, local, offset=0):
        if not offset:
            return self.s.get(remote, local)
        with self.s.open(remote, 'rb') as src, open(local, 'ab') as dst:
            src.seek(offset)
            dst.write(src.read())
    def ls(self, d): return self.s.listdir(d)
    def mv(self, a, b): self.s.rename(a, b)
    def rm(self, p): self.s.remove(p)
    def close(self): self.s.close()

c = Ftp() if client == 'ftplib' else Sftp()
if action == 'put':
    try:
        c.mkdir(os.path.dirname(args[1]))
    except c.error:
        pass
    c.put(*args)
elif action == 'get':
    c.get(*args)
elif action == 'resume':
    c.get(args[0], args[1], os.path.getsize(args[1]))
elif action == 'ls':
    print('\n'.join(c.ls(args[0])))
elif action == 'mv':
    c.mv(*args)
elif action == 'rm':
    c.rm(*args)
elif action == 'try':  # one operation that may be refused: prints 'ok' or 'refused <why>'
    op, remote = args
    if remote.startswith('bytes:'):  # a name with bytes that are not UTF-8, as '\xff' escapes
        raw = remote[6:].encode().decode('unicode_escape').encode('latin-1')
        if client == 'ftplib':
            c.f.encoding = 'latin-1'  # sends each character below 256 as that byte
            remote = raw.decode('latin-1')
        else:
            remote = raw
    try:
        {'put': lambda: c.put(os.devnull, remote), 'get': lambda: c.get(remote, os.path.join(env['HOME'], 'try.bin')),
         'rm': lambda: c.rm(remote)}[op]()
        print('ok')
    except c.error as e:
        print('refused', e)
c.close()
`;

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-clients-'));
  scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-clients-work-'));
  token = (await addOwner(dataDir, 'alice')).token;
  await setPassword(dataDir, 'alice', PASSWORD);
  const key = generateEd25519KeyPair('alice@clients');
  await fs.writeFile(path.join(scratch, 'id_ed25519'), key.private, { mode: 0o600 });
  await addKey(dataDir, 'alice', key.public);
  server = await startAllProtocols(dataDir);
  ports = {
    http: Number(new URL(server.url).port),
    sftp: server.sftp?.port ?? 0,
    ftps: server.ftps?.port ?? 0,
  };
  http = new RepositoryClient({ url: server.url, token });
  // The host key is pinned: known_hosts holds the one the server made on first start.
  const hostKey = await sh('ssh-keygen', ['-y', '-f', path.join(dataDir, 'ssh_host_ed25519_key')]);
  files = {
    cert: path.join(dataDir, 'ftps_cert.pem'),
    key: path.join(scratch, 'id_ed25519'),
    knownHosts: path.join(scratch, 'known_hosts'),
    py: path.join(scratch, 'client.py'),
  };
  await fs.writeFile(files.knownHosts, `[127.0.0.1]:${ports.sftp} ${hostKey.trim()}\n`);
  await fs.writeFile(files.py, PY_SCRIPT);
  const obscured = (await sh('rclone', ['obscure', PASSWORD])).trim();
  rcloneEnv = (remote) =>
    remote === 'sftp'
      ? {
          RCLONE_CONFIG_VSP_TYPE: 'sftp',
          RCLONE_CONFIG_VSP_HOST: '127.0.0.1',
          RCLONE_CONFIG_VSP_PORT: String(ports.sftp),
          RCLONE_CONFIG_VSP_USER: 'alice',
          RCLONE_CONFIG_VSP_KEY_FILE: files.key,
          RCLONE_CONFIG_VSP_KNOWN_HOSTS_FILE: files.knownHosts,
          // No remote shell: rclone would run md5sum and friends there.
          RCLONE_CONFIG_VSP_SHELL_TYPE: 'none',
          RCLONE_CONFIG_VSP_DISABLE_HASHCHECK: 'true',
        }
      : {
          RCLONE_CONFIG_VSP_TYPE: 'ftp',
          RCLONE_CONFIG_VSP_HOST: '127.0.0.1',
          RCLONE_CONFIG_VSP_PORT: String(ports.ftps),
          RCLONE_CONFIG_VSP_USER: 'alice',
          RCLONE_CONFIG_VSP_PASS: obscured,
          RCLONE_CONFIG_VSP_EXPLICIT_TLS: 'true',
          // rclone 1.60 has no CA option for FTP; the other FTPS clients here pin the certificate.
          RCLONE_CONFIG_VSP_NO_CHECK_CERTIFICATE: 'true',
        };
});

afterAll(async () => {
  await server?.close();
  await fs.rm(dataDir, { recursive: true, force: true });
  await fs.rm(scratch, { recursive: true, force: true });
});

const slug = (name: string): string => name.toLowerCase().replace(/[^a-z0-9]+/g, '-');

describe.each(CLIENTS.map((c) => [c.name, c] as const))('%s', (_name, client) => {
  const folder = `matrix/${slug(client.name)}`;
  const local = (n: string): string => path.join(scratch, `${slug(client.name)}-${n}`);

  test('uploads, downloads, lists, renames and deletes', async () => {
    const data = randomBytes(300_000 + randomInt(1000));
    await fs.writeFile(local('src.bin'), data);
    await client.upload(local('src.bin'), `${folder}/a.bin`);
    expect((await http.stat('alice', `${folder}/a.bin`))?.sha256).toBe(sha(data));

    await client.download(`${folder}/a.bin`, local('dst.bin'));
    expect(sha(await fs.readFile(local('dst.bin')))).toBe(sha(data));

    await http.upload('alice', `${folder}/other.txt`, Readable.from([Buffer.from('other')]), { size: 5 });
    expect((await client.list(folder)).sort()).toEqual(['a.bin', 'other.txt']);

    let last = `${folder}/a.bin`;
    if (client.rename) {
      await client.rename(last, `${folder}/b.bin`);
      expect(await http.stat('alice', last)).toBeUndefined();
      last = `${folder}/b.bin`;
      expect((await http.stat('alice', last))?.sha256).toBe(sha(data));
    }
    await client.remove(last);
    expect(await http.stat('alice', last)).toBeUndefined();
    expect((await http.list('alice', `${folder}/`)).map((f) => f.path)).toEqual([`${folder}/other.txt`]);
  });

  const resumes = client.resume ? 'resumes a download' : `resume skipped: ${client.noResume}`;
  (client.resume ? test : test.skip)(resumes, async () => {
    const data = randomBytes(500_000);
    await http.upload('alice', `${folder}/resume.bin`, Readable.from([data]), { size: data.length });
    // A download cut off part way. The part held locally is zeros here, so the result shows that the
    // client fetched only the rest (a whole new download would replace them).
    const held = Buffer.alloc(123_457);
    await fs.writeFile(local('partial.bin'), held);
    await client.resume?.(`${folder}/resume.bin`, local('partial.bin'));
    const got = await fs.readFile(local('partial.bin'));
    expect(got.length).toBe(data.length);
    expect(sha(got)).toBe(sha(Buffer.concat([held, data.subarray(held.length)])));
  });
});

/** What one protocol answers when a file operation is spelled as a folder: 'ok' or 'refused <why>'. */
const attempts: [string, (op: 'put' | 'get' | 'rm', p: string) => Promise<string>][] = [
  [
    'HTTP',
    async (op, p) => {
      // Not `-T`, which appends the local file's name to a URL that ends with '/'.
      const args = {
        put: ['-X', 'PUT', '--data-binary', 'x'],
        get: ['-o', '/dev/null'],
        rm: ['-X', 'DELETE'],
      }[op];
      return curlHttp('--path-as-is', ...args, httpUrl(p)).then(
        () => 'ok',
        (err: Error) => `refused ${err.message}`,
      );
    },
  ],
  ['SFTP (paramiko)', async (op, p) => (await python('paramiko', 'try', op, p)).trim()],
  ['FTPS (ftplib)', async (op, p) => (await python('ftplib', 'try', op, p)).trim()],
];

describe.each(attempts)('path rules over %s', (protocol, attempt) => {
  test("a trailing '/', a '.' segment or bytes that are not UTF-8 never write, read or remove a file", async () => {
    const dir = `trailing/${slug(protocol)}`;
    await http.upload('alice', `${dir}/x.txt`, Readable.from([Buffer.from('x')]), { size: 1 });
    // `PUT a/` once wrote the file `a`.
    expect(await attempt('put', `${dir}/a/`)).toMatch(/^refused/);
    expect(await http.stat('alice', `${dir}/a`)).toBeUndefined();
    expect(await attempt('get', `${dir}/x.txt/`)).toMatch(/^refused/);
    expect(await attempt('rm', `${dir}/x.txt/`)).toMatch(/^refused/);
    expect((await http.stat('alice', `${dir}/x.txt`))?.size).toBe(1);
    // '.' as a segment is refused alike (FTPS once took `a/.` as `a`).
    expect(await attempt('put', `${dir}/b/.`)).toMatch(/^refused/);
    expect(await attempt('get', `${dir}/x.txt/.`)).toMatch(/^refused/);
    expect((await http.list('alice', `${dir}/`)).map((f) => f.path)).toEqual([`${dir}/x.txt`]);
    // A name that is not UTF-8 is refused, never stored with U+FFFD in place of its bytes.
    const notUtf8 = protocol === 'HTTP' ? `${dir}/bad%FF.txt` : `bytes:${dir}/bad\\xff.txt`;
    expect(await attempt('put', notUtf8)).toMatch(/^refused[\s\S]*UTF-8/);
    // The same operations on the file's own name work.
    expect(await attempt('get', `${dir}/x.txt`)).toBe('ok');
    expect(await attempt('rm', `${dir}/x.txt`)).toBe('ok');
  });
});
