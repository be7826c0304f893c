import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { generateEd25519KeyPair } from '../../lib/sshKeyPair';
import { currentPlatformTriple, excludePatterns, productionPackagePaths } from '../../deploy/cluster/bundle';
import { parseFacts, parseFileDump, parseXlInfo, preflightProblems, shq } from '../../deploy/cluster/deploy';
import {
  clusterStorageOf,
  loadDeploySecrets,
  parseInventory,
  requireDeployable,
  type DeployInventory,
} from '../../deploy/cluster/inventory';
import {
  fileChange,
  KNOWN_HOSTS_BEGIN,
  KNOWN_HOSTS_END,
  planHost,
  serviceAction,
  staleReleases,
  STEP_NAMES,
  storageChanges,
  workerIdentityPrefix,
} from '../../deploy/cluster/plan';
import { formatPlan, formatReport } from '../../deploy/cluster/report';
import { fingerprint, parsePublicKeyLine } from '../../deploy/cluster/sshSession';

const hostKeyA = generateEd25519KeyPair().public;
const hostKeyB = generateEd25519KeyPair().public;

function inventory(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    version: 1,
    ssh: { user: 'root', identityFile: '/keys/id_ed25519' },
    hosts: [
      { name: 'a', address: '10.0.0.1', hostKey: hostKeyA },
      { name: 'b', address: '10.0.0.2', hostKey: `${hostKeyB} root@b`, labels: { rack: '1' } },
    ],
    cluster: {
      temporalAddress: '10.0.0.254:7233',
      repositoryUrl: 'http://10.0.0.254:8420',
      repositoryTokenFile: '/keys/token',
    },
    ...overrides,
  };
}

const deployable = (o: Record<string, unknown> = {}) => requireDeployable(parseInventory(inventory(o)));

function errorOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    return (err as Error).message;
  }
  throw new Error('expected an error');
}

describe('inventory', () => {
  it('parses the contract format and fills the defaults', () => {
    const inv = deployable();
    expect(inv.ssh.port).toBe(22);
    expect(inv.hosts[0].labels).toEqual({});
    expect(inv.cluster).toMatchObject({
      driver: 'xen',
      temporalNamespace: 'default',
      storeDir: '/var/lib/vsp/store',
      mountRoot: '/var/lib/vsp/cluster',
      exportPath: '/vsp',
      nfsVersion: '4.2',
      qemuAccount: { user: 'vsp-qemu', uid: 64090, gid: 64090 },
      applianceDir: '/var/lib/vsp/appliance',
    });
  });

  it('accepts vm-cluster output without cluster settings, but a deploy needs them', () => {
    const inv = parseInventory(inventory({ cluster: undefined }));
    expect(errorOf(() => requireDeployable(inv))).toMatch(/cluster: required for a deploy/);
  });

  it('names every bad field by its path', () => {
    const msg = errorOf(() =>
      parseInventory(
        inventory({
          version: 2,
          ssh: { identityFile: 'relative/key' },
          hosts: [
            { name: 'A_1', address: '10.0.0.300', hostKey: 'ssh-ed25519 not-base64' },
            { name: 'b', address: '10.0.0.2', hostKey: hostKeyB, extra: 1 },
          ],
          cluster: {
            temporalAddress: '10.0.0.254',
            repositoryUrl: 'ftp://x',
            repositoryTokenFile: '/t',
            driver: 'process',
            xenGuestCpus: '1;reboot',
          },
        }),
      ),
    );
    for (const field of [
      'version:',
      'ssh.identityFile: ssh.identityFile must be an absolute path',
      'hosts[0].name: host names',
      'hosts[0].address:',
      'hosts[0].hostKey: not a public key line',
      'hosts[1]: Unrecognized key: "extra"',
      'cluster.temporalAddress: an address host:port',
      'cluster.repositoryUrl:',
      'cluster.driver:',
      'cluster.xenGuestCpus: a CPU list like 1-3 or 1,3',
    ])
      expect(msg).toContain(field);
  });

  it('refuses a private key, duplicate names and addresses, and a storage layout that loops', () => {
    const priv = generateEd25519KeyPair().private;
    expect(
      errorOf(() =>
        parseInventory(inventory({ hosts: [{ name: 'a', address: '10.0.0.1', hostKey: priv }] })),
      ),
    ).toContain('hosts[0].hostKey: not a public key line');
    const dup = errorOf(() =>
      parseInventory(
        inventory({
          hosts: [
            { name: 'a', address: '10.0.0.1', hostKey: hostKeyA },
            { name: 'a', address: '10.0.0.1', hostKey: hostKeyB },
          ],
        }),
      ),
    );
    expect(dup).toContain('hosts[1].name: a is also hosts[0]');
    expect(dup).toContain("hosts[1].address: 10.0.0.1 is also host a's");
    const loop = errorOf(() =>
      parseInventory(
        inventory({
          cluster: {
            temporalAddress: 'temporal:7233',
            repositoryUrl: 'http://r',
            repositoryTokenFile: '/t',
            storeDir: '/var/lib/vsp',
            mountRoot: '/var/lib/vsp/cluster',
          },
        }),
      ),
    );
    expect(loop).toMatch(
      /storeDir \/var\/lib\/vsp and mountRoot \/var\/lib\/vsp\/cluster must not contain each other/,
    );
  });

  it('gives each host the cluster storage with its own store and export path', () => {
    const inv = deployable({
      hosts: [
        { name: 'a', address: '10.0.0.1', hostKey: hostKeyA, storeDir: '/srv/store' },
        { name: 'b', address: '10.0.0.2', hostKey: hostKeyB, exportPath: '/vspb' },
      ],
    });
    expect(clusterStorageOf(inv, inv.hosts[0])).toMatchObject({
      storeDir: '/srv/store',
      clusterStorage: {
        a: { address: '10.0.0.1', exportPath: '/vsp' },
        b: { address: '10.0.0.2', exportPath: '/vspb' },
      },
    });
    expect(clusterStorageOf(inv, inv.hosts[1]).storeDir).toBe('/var/lib/vsp/store');
  });

  describe('local secrets', () => {
    let dir: string;
    beforeEach(async () => {
      dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-inv-'));
    });
    afterEach(() => fs.rm(dir, { recursive: true, force: true }));

    const withFiles = (key: string, keyMode: number, token: string, tokenMode: number) => async () => {
      await fs.writeFile(path.join(dir, 'key'), key, { mode: keyMode });
      await fs.writeFile(path.join(dir, 'token'), token, { mode: tokenMode });
      const inv = deployable();
      return loadDeploySecrets({
        ...inv,
        ssh: { ...inv.ssh, identityFile: path.join(dir, 'key') },
        cluster: { ...inv.cluster, repositoryTokenFile: path.join(dir, 'token') },
      } as DeployInventory);
    };

    it('reads the key and the first line of the token file', async () => {
      const priv = generateEd25519KeyPair().private;
      const s = await withFiles(priv, 0o600, 'service-token-0123456789\nignored\n', 0o600)();
      expect(s.repositoryToken).toBe('service-token-0123456789');
      expect(s.privateKey.toString()).toBe(priv);
    });

    it('refuses files others can read, a public key, a short token and a missing file', async () => {
      await expect(withFiles(hostKeyA, 0o644, 'short', 0o640)()).rejects.toThrow(
        /ssh.identityFile: .* is readable by other accounts \(mode 644\).*ssh.identityFile: .* is not an unencrypted private key.*cluster.repositoryTokenFile: .* readable by other accounts.*shorter than 16/,
      );
      const inv = deployable();
      await expect(
        loadDeploySecrets({
          ...inv,
          ssh: { ...inv.ssh, identityFile: path.join(dir, 'none') },
        } as DeployInventory),
      ).rejects.toThrow(/ssh.identityFile: cannot read .*none/);
    });
  });
});

describe('plan', () => {
  const inv = deployable();
  const plan = planHost(inv, inv.hosts[0], 'service-token-0123456789', '[Unit]\n');
  const file = (p: string) => plan.files.find((f) => f.path === p);

  it('has every step in order and checks the other hosts and the worker', () => {
    expect(plan.steps.map((s) => s.name)).toEqual([...STEP_NAMES]);
    expect(plan.peerMounts).toEqual([
      { host: 'b', where: '/var/lib/vsp/cluster/b', source: '10.0.0.2:/vsp' },
    ]);
    expect(plan.taskQueue).toBe('vsp-host-a');
    expect(plan.storageCommand).toEqual([
      '/opt/vsp/deploy/production/setup-storage.sh',
      '--host',
      'a',
      '--config',
      '/etc/vsp/cluster.json',
    ]);
  });

  it("writes the worker's environment (0600, with the token) and the cluster file it names", () => {
    const env = file('/etc/vsp/host-worker.env');
    expect(env).toMatchObject({ mode: 0o600, secret: true, restartsWorker: true });
    expect(env?.content.split('\n')).toEqual(
      expect.arrayContaining([
        'VSP_HOST=a',
        'VSP_CONFIG=/etc/vsp/cluster.json',
        'VSP_REPOSITORY_URL=http://10.0.0.254:8420',
        'VSP_REPOSITORY_TOKEN=service-token-0123456789',
        'VSP_DRIVERS=xen',
        'VSP_APPLIANCE_DIR=/var/lib/vsp/appliance',
        'VSP_QEMU_USER=vsp-qemu',
        'TEMPORAL_ADDRESS=10.0.0.254:7233',
        'TEMPORAL_NAMESPACE=default',
      ]),
    );
    expect(env?.content).not.toContain('VSP_QEMU_REMOTE_DISKS');
    const cluster = JSON.parse(file('/etc/vsp/cluster.json')?.content ?? '');
    expect(cluster).toEqual(clusterStorageOf(inv, inv.hosts[0]));
    expect(file('/etc/systemd/system/vsp-host-worker.service')?.content).toBe('[Unit]\n');
  });

  it("gives Xen hosts the guests' CPU list when the inventory has one", () => {
    const cpus = (o: Record<string, unknown>) => {
      const i = deployable({ cluster: { ...(inventory().cluster as object), ...o } });
      return planHost(i, i.hosts[0], 'service-token-0123456789', '')
        .files[1].content.split('\n')
        .filter((l) => l.startsWith('VSP_XEN_GUEST_CPUS'));
    };
    expect(cpus({ xenGuestCpus: '1-3' })).toEqual(['VSP_XEN_GUEST_CPUS=1-3']);
    expect(cpus({})).toEqual([]);
    expect(cpus({ xenGuestCpus: '1', driver: 'qemu' })).toEqual([]);
  });

  it('quotes environment values systemd would otherwise interpret', () => {
    const q = planHost(inv, inv.hosts[0], 'tok en"$x0123456789', '');
    expect(q.files[1].content).toContain('VSP_REPOSITORY_TOKEN="tok en\\"\\$x0123456789"');
  });

  it('records every host key for xl migrate, without comments', () => {
    const kh = file('/etc/ssh/ssh_known_hosts');
    expect(kh?.block).toEqual({ begin: KNOWN_HOSTS_BEGIN, end: KNOWN_HOSTS_END });
    expect(kh?.content.split('\n')).toEqual([
      KNOWN_HOSTS_BEGIN,
      `a,10.0.0.1 ${hostKeyA.trim()}`,
      `b,10.0.0.2 ${hostKeyB.trim().split(' ').slice(0, 2).join(' ')}`,
      KNOWN_HOSTS_END,
    ]);
  });

  it('prints the plan without the token', () => {
    const text = formatPlan([plan], { 'service-token-0123456789': 'token from /keys/token' });
    expect(text).not.toContain('service-token-0123456789');
    expect(text).toContain('VSP_REPOSITORY_TOKEN=<token from /keys/token>');
    expect(text).toMatch(/^host a \(10\.0\.0\.1\)\n {2}1\. connect/);
  });
});

describe('idempotence', () => {
  const inv = deployable();
  const plan = planHost(inv, inv.hosts[0], 'service-token-0123456789', '[Unit]\n');
  const [clusterFile, envFile, , knownHosts] = plan.files;

  it('writes a file only when its content or mode differs', () => {
    expect(fileChange(envFile, undefined, undefined).action).toBe('create');
    expect(fileChange(envFile, envFile.content, 0o600).action).toBe('unchanged');
    expect(fileChange(envFile, envFile.content, 0o644).action).toBe('update');
    expect(fileChange(clusterFile, '{}\n', 0o644)).toEqual({
      action: 'update',
      content: clusterFile.content,
    });
  });

  it("replaces only its block of a shared file and keeps the administrator's lines", () => {
    const theirs = '10.9.9.9 ssh-ed25519 AAAAother\n';
    const first = fileChange(knownHosts, theirs, 0o644);
    expect(first.action).toBe('update');
    expect(first.content).toBe(`${theirs}\n${knownHosts.content}\n`);
    expect(fileChange(knownHosts, first.content, 0o644).action).toBe('unchanged');
    expect(() => fileChange(knownHosts, `${KNOWN_HOSTS_BEGIN}\n`, 0o644)).toThrow(/fix them by hand/);
  });

  it("reads setup-storage's report: only created, updated and removed files are changes", () => {
    const report = [
      'unchanged    /etc/exports',
      'created      /etc/systemd/system/var-lib-vsp-cluster-b.mount',
      'removed      /etc/systemd/system/var-lib-vsp-cluster-c.automount',
      'ran          systemctl daemon-reload',
      'mount        /var/lib/vsp/cluster/b <- 10.0.0.2:/vsp (nfs, store of b)',
    ].join('\n');
    expect(storageChanges(report)).toEqual([
      'created /etc/systemd/system/var-lib-vsp-cluster-b.mount',
      'removed /etc/systemd/system/var-lib-vsp-cluster-c.automount',
    ]);
    expect(storageChanges('unchanged    /etc/exports\nran          exportfs -ra\n')).toEqual([]);
  });

  it('restarts the worker only when it is down or what it runs or reads changed', () => {
    expect(serviceAction(false, { release: false, workerFiles: false })).toBe('start');
    expect(serviceAction(true, { release: false, workerFiles: false })).toBe('none');
    expect(serviceAction(true, { release: true, workerFiles: false })).toBe('restart');
    expect(serviceAction(true, { release: false, workerFiles: true })).toBe('restart');
  });

  it('keeps the current and the newest other release', () => {
    const [r1, r2, r3] = ['1', '2', '3'].map((c) => c.repeat(64));
    // Newest first, as `ls -t` lists them: a redeploy of r2 keeps r3, the one it replaces.
    expect(staleReleases([r3, r2, '.incoming-x', r1, 'notes'], r3)).toEqual([r1]);
    expect(staleReleases([r3, r2, r1], r2)).toEqual([r1]);
    expect(staleReleases([r1], r1)).toEqual([]);
  });

  it("matches only the new worker's poller (its pid is in its identity)", () => {
    const prefix = workerIdentityPrefix('a', 812);
    expect('vsp-host-a@812.1f2e3d4c'.startsWith(prefix)).toBe(true);
    expect('vsp-host-a@8120.1f2e3d4c'.startsWith(prefix)).toBe(false);
    expect('vsp-host-ab@812.1f2e3d4c'.startsWith(prefix)).toBe(false);
  });
});

describe('host facts', () => {
  const tools = [
    'systemctl',
    'exportfs',
    'mount.nfs',
    'tar',
    'gzip',
    'sha256sum',
    'findmnt',
    'useradd',
    'xl',
  ];
  const facts = (extra: string[]) =>
    parseFacts(
      ['uid=0', 'arch=x86_64', 'node=v20.19.1', ...tools.map((t) => `tool=${t}`), ...extra].join('\n'),
    );
  const local = { nodeMajor: '20', arch: 'x64' };

  it('accepts a root login with the same node major and architecture and every tool', () => {
    expect(preflightProblems(facts([]), 'xen', local)).toEqual([]);
  });

  it('names each problem', () => {
    const f = parseFacts('uid=1000\narch=aarch64\nnode=v18.19.0\ntool=tar\n');
    const bad = preflightProblems(f, 'xen', local).join('\n');
    expect(bad).toContain('needs root on the host (ssh.user logs in as uid 1000)');
    expect(bad).toContain('the host is aarch64, this build is for x86_64');
    expect(bad).toContain('node v18.19.0 on the host');
    expect(bad).toContain('exportfs is missing (nfs-kernel-server)');
    expect(bad).toContain('xl is missing');
    expect(preflightProblems(parseFacts('uid=0\narch=x86_64\nnode=\n'), 'qemu', local).join()).toContain(
      'node is not installed',
    );
  });

  it("reads the config step's file dump: absent, empty and present files in order", () => {
    const b64 = Buffer.from('A=1\n').toString('base64');
    expect(parseFileDump(`== -\n\n== 644\n\n== 600\n${b64}\n`)).toEqual([
      undefined,
      { mode: 0o644, content: '' },
      { mode: 0o600, content: 'A=1\n' },
    ]);
  });

  it('reads xl info', () => {
    expect(parseXlInfo('host : a\nxen_version : 4.17.7\nvirt_caps : pv hvm hap\n')).toMatchObject({
      xen_version: '4.17.7',
      virt_caps: 'pv hvm hap',
    });
  });

  it('quotes for the remote shell', () => {
    expect(shq("it's")).toBe(`'it'\\''s'`);
  });
});

describe('release bundle', () => {
  it("takes each installed production package's top folder once, from the lockfile", () => {
    const lock = {
      packages: {
        '': {},
        'node_modules/zod': {},
        'node_modules/@t/w': {},
        'node_modules/@t/w/node_modules/x': {},
        'node_modules/jest': { dev: true },
        'node_modules/fsevents': { dev: true, optional: true },
        'node_modules/both': { devOptional: true },
        'node_modules/argon2-darwin': { optional: true },
      },
    };
    const installed = (dir: string) => dir !== 'node_modules/argon2-darwin';
    expect(productionPackagePaths(lock, installed)).toEqual(['node_modules/@t/w', 'node_modules/zod']);
    expect(() => productionPackagePaths(lock, (dir) => dir !== 'node_modules/zod')).toThrow(
      "production packages are not installed (node_modules/zod): run 'npm ci'",
    );
  });

  it("drops other platforms' binaries", () => {
    expect(currentPlatformTriple('x64', 'linux')).toBe('x86_64-unknown-linux-gnu');
    expect(excludePatterns(['aarch64-apple-darwin'])).toContain(
      'node_modules/@temporalio/core-bridge/releases/aarch64-apple-darwin',
    );
  });
});

describe('ssh host keys', () => {
  it('fingerprints like ssh-keygen -l', () => {
    const { type, blob } = parsePublicKeyLine(hostKeyA);
    expect(type).toBe('ssh-ed25519');
    expect(fingerprint(blob)).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
  });
});

describe('report', () => {
  it('names the failed host, its step and the cause, and says the others are deployed', () => {
    const text = formatReport({
      ok: false,
      ms: 5000,
      release: { sha256: 'f'.repeat(64), bytes: 42e6 },
      hosts: [
        {
          host: 'a',
          address: '10.0.0.1',
          ok: true,
          ms: 4000,
          steps: [{ name: 'release', status: 'unchanged', ms: 10, details: [] }],
        },
        {
          host: 'b',
          address: '10.0.0.2',
          ok: false,
          ms: 3000,
          failed: { step: 'storage', error: 'exportfs: boom' },
          steps: [],
        },
      ],
    });
    expect(text).toContain('a: deployed in 4.0 s, nothing changed');
    expect(text).toContain('b: FAILED at step storage after 3.0 s: exportfs: boom');
    expect(text).toContain('1 of 2 host(s) failed; the others are deployed');
  });
});
