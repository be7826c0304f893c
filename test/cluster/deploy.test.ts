import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { generateEd25519KeyPair } from '../../lib/sshKeyPair';
import { clusterInventory, deployCluster, inventoryFile, markDeployed, onHostOk, vspCli } from './harness';

/**
 * `vsp cluster deploy` on the real Xen dom0s, typed as deploy/production/README.md section 0 types it:
 * the first deploy installs and checks every host, a second one changes nothing, and a host that
 * presents another host key than the inventory's is refused while the others deploy.
 */

const DEPLOY_TIMEOUT_MS = 25 * 60_000;
const vsp = vspCli;

/** `a: deployed in 132.5 s, nothing changed` lines of the report, by host. */
function deployedLines(stdout: string): Record<string, { seconds: number; changes: string }> {
  const out: Record<string, { seconds: number; changes: string }> = {};
  for (const m of stdout.matchAll(/^(\S+): deployed in ([\d.]+) s, (.*)$/gm))
    out[m[1]] = { seconds: Number(m[2]), changes: m[3] };
  return out;
}

const mainPid = async (host: string) =>
  Number((await onHostOk(host, 'systemctl show -p MainPID --value vsp-host-worker.service')).trim());

describe('vsp cluster deploy on the Xen hosts', () => {
  let hosts: string[];
  let dir: string;
  let inventory: string;

  beforeAll(async () => {
    hosts = (await clusterInventory()).hosts.map((h) => h.name);
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-deploy-'));
    inventory = inventoryFile();
  });

  afterAll(() => (dir ? fs.rm(dir, { recursive: true, force: true }) : undefined));

  test('--dry-run prints the plan of every host and connects to nothing', async () => {
    const r = await vsp(['cluster', 'deploy', '--inventory', inventory, '--dry-run']);
    expect(r.code).toBe(0);
    for (const h of hosts) expect(r.stdout).toMatch(new RegExp(`^host ${h} \\(`, 'm'));
    expect(r.stdout).toMatch(/VSP_REPOSITORY_TOKEN=<token from \//);
    expect(r.stderr).not.toContain('"step":"connect"');
  });

  test(
    'the first deploy installs and checks every host; a second one changes nothing',
    async () => {
      const first = await deployCluster();
      await markDeployed();
      const firstLines = deployedLines(first.stdout);
      expect(Object.keys(firstLines).sort()).toEqual([...hosts].sort());
      for (const h of hosts) {
        // The check step's findings: Xen answers, every other host's export is mounted, the worker polls.
        expect(first.stdout).toMatch(new RegExp(`^${h}: check unchanged .*xl info: xen 4\\.17`, 'm'));
        expect(first.stdout).toMatch(
          new RegExp(`^${h}: check .*vsp-host-${h}@\\d+\\.\\w+ polls vsp-host-${h}$`, 'm'),
        );
        for (const peer of hosts.filter((p) => p !== h))
          expect(first.stdout).toMatch(
            new RegExp(`^${h}: check .*/var/lib/vsp/cluster/${peer} <- [\\d.]+:/vsp \\(nfs4\\)`, 'm'),
          );
        expect(
          await onHostOk(
            h,
            'systemctl is-active vsp-host-worker.service; stat -c %a /etc/vsp/host-worker.env',
          ),
        ).toBe('active\n600\n');
        expect(await onHostOk(h, 'readlink /opt/vsp')).toMatch(/^\/opt\/vsp-releases\/[0-9a-f]{64}\n$/);
      }
      const pids = Object.fromEntries(
        await Promise.all(hosts.map(async (h) => [h, await mainPid(h)] as const)),
      );

      const second = await deployCluster();
      const secondLines = deployedLines(second.stdout);
      for (const h of hosts) {
        expect(secondLines[h]?.changes).toBe('nothing changed');
        expect(second.stdout).not.toMatch(new RegExp(`^${h}: \\w+ changed`, 'm'));
        // Not restarted: the same worker process polls.
        expect(await mainPid(h)).toBe(pids[h]);
      }
      process.stderr.write(
        `deploy figures (s per host, first / second): ${hosts
          .map((h) => `${h} ${firstLines[h].seconds} / ${secondLines[h].seconds}`)
          .join(', ')}\n`,
      );
    },
    DEPLOY_TIMEOUT_MS,
  );

  test(
    'a host that presents another host key is refused; the others deploy',
    async () => {
      const inv = JSON.parse(await fs.readFile(inventory, 'utf8'));
      const [victim] = hosts.slice(-1);
      const others = hosts.filter((h) => h !== victim);
      inv.hosts.find((h: { name: string }) => h.name === victim).hostKey = generateEd25519KeyPair().public;
      const file = path.join(dir, 'wrong-host-key.json');
      await fs.writeFile(file, JSON.stringify(inv));
      try {
        const r = await vsp(['cluster', 'deploy', '--inventory', file]);
        expect(r.code).toBe(1);
        expect(r.stdout).toMatch(
          new RegExp(
            `^${victim}: FAILED at step connect after [\\d.]+ s: refusing ${victim} \\(root@[\\d.]+:22\\): its host key SHA256:\\S+ is not the inventory's hostKey`,
            'm',
          ),
        );
        expect(r.stderr).toContain(`vsp: the deploy failed on ${victim}`);
        // The others deploy; the inventory's (wrong) key of the victim reaches their known hosts, nothing else.
        for (const h of others) expect(deployedLines(r.stdout)[h]?.changes).toBe('changed: config');
      } finally {
        // The other hosts' ssh_known_hosts must name the victim's real key again (xl migrate checks it).
        const restored = await vsp(['cluster', 'deploy', '--inventory', inventory]);
        expect(restored.code).toBe(0);
        for (const h of others) expect(deployedLines(restored.stdout)[h]?.changes).toBe('changed: config');
        expect(deployedLines(restored.stdout)[victim]?.changes).toBe('nothing changed');
      }
    },
    DEPLOY_TIMEOUT_MS,
  );
});
