import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { repoRoot } from '../../deploy/devcluster/tools';
import { startClusterFixture, type ClusterFixture } from '../support/clusterFixture';
import { temporalAddress } from '../support/temporalEnv';

let fx: ClusterFixture;
let tmp: string;

beforeAll(async () => {
  fx = await startClusterFixture({ hosts: ['a'], owners: ['carol'] });
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-cli-'));
}, 180_000);

afterAll(async () => {
  await fx?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

function vsp(args: string[], opts: { input?: string; token?: string } = {}) {
  const r = spawnSync(process.execPath, [path.join(repoRoot(), 'dist', 'cli', 'vsp.js'), ...args], {
    input: opts.input,
    encoding: 'utf8',
    cwd: tmp,
    env: {
      ...process.env,
      TEMPORAL_ADDRESS: temporalAddress(),
      VSP_REPOSITORY_URL: fx.cluster.repositoryUrl,
      VSP_OWNER: 'carol',
      VSP_TOKEN: opts.token ?? fx.cluster.ownerTokens.get('carol'),
    },
    timeout: 120_000,
  });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

test('upload, submit --watch, list and download through the vsp CLI', async () => {
  await fs.writeFile(path.join(tmp, 'words.txt'), 'b\na\nc\n');
  const up = vsp(['--json', 'upload', 'words.txt', 'in/words.txt']);
  expect(up.code).toBe(0);
  expect(JSON.parse(up.out).sha256).toBe(createHash('sha256').update('b\na\nc\n').digest('hex'));
  expect(vsp(['ls', 'in/']).out).toContain('in/words.txt');

  const spec = {
    owner: 'carol',
    inputs: ['in/words.txt'],
    command: 'mkdir -p out && sort in/words.txt > out/sorted.txt',
  };
  const run = vsp(['--json', 'submit', '-', '--watch', '--task-id', `cli-${Date.now()}`], {
    input: JSON.stringify(spec),
  });
  expect(run.code).toBe(0);
  const result = JSON.parse(run.out.trim().split('\n').pop()!);
  const sorted = result.outputs.find((o: { path: string }) => o.path.endsWith('outputs/sorted.txt'));
  expect(vsp(['download', sorted.path, 'sorted.txt']).code).toBe(0);
  expect(await fs.readFile(path.join(tmp, 'sorted.txt'), 'utf8')).toBe('a\nb\nc\n');

  const listed = JSON.parse(vsp(['--json', 'list', '--owner', 'carol']).out);
  expect(listed.map((t: { taskId: string }) => t.taskId)).toContain(result.taskId);
});

test('the CLI refuses a bad spec naming the field, and a bad token', () => {
  const bad = vsp(['submit', '-'], { input: JSON.stringify({ owner: 'carol', command: 'true', vcpus: 0 }) });
  expect(bad.code).toBe(2);
  expect(bad.err).toMatch(/vcpus/);
  const notJson = vsp(['submit', '-'], { input: '{owner:' });
  expect(notJson.code).toBe(1);
  expect(notJson.err).toMatch(/not valid JSON/);
  const denied = vsp(['ls'], { token: 'vsp_wrongwrongwrongwrongwrong' });
  expect(denied.code).toBe(1);
  expect(denied.err).toMatch(/401|token|auth/i);
});
