import { execFile } from 'node:child_process';
import { promises as fs, realpathSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { repoRoot } from '../../deploy/devcluster/tools';

/**
 * The client as a package (README "Using the client library"): `npm pack`, installed into a scratch folder
 * outside the repository, imported from CommonJS and ESM, and type-checked from TypeScript. Needs the
 * build (dist/, declarations included), no servers.
 *
 * The install is npm's own, offline, with the package's dependencies given as links to the ones this
 * repository installed: npm still checks that every dependency the tarball declares is there in a
 * version its range accepts, and the package can only load what it declares; but the test needs neither
 * the registry nor a warm npm cache (the machine's cache lacks some packages, so a plain `--offline`
 * install fails), and no install script runs.
 */

const run = promisify(execFile);
let scratch: string;
let tarball: string;

const installed = (...p: string[]) => path.join(scratch, 'node_modules', ...p);

/** Runs a script in the scratch folder with node; its standard output. */
async function node(file: string, source: string): Promise<string> {
  await fs.writeFile(path.join(scratch, file), source);
  return (await run(process.execPath, [file], { cwd: scratch })).stdout;
}

beforeAll(async () => {
  scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-library-'));
  const root = repoRoot();
  const packed = await run('npm', ['pack', '--json', '--pack-destination', scratch], { cwd: root });
  tarball = path.join(scratch, (JSON.parse(packed.stdout) as { filename: string }[])[0].filename);
  const modules = realpathSync(path.join(root, 'node_modules'));
  const manifest = JSON.parse(await fs.readFile(path.join(root, 'package.json'), 'utf8')) as {
    dependencies: Record<string, string>;
  };
  // The consumer's own: the package itself, its dependencies, and Node's types for the TypeScript check.
  const deps: Record<string, string> = {
    vsp: `file:${tarball}`,
    '@types/node': `file:${path.join(modules, '@types/node')}`,
  };
  for (const name of Object.keys(manifest.dependencies)) deps[name] = `file:${path.join(modules, name)}`;
  await fs.writeFile(
    path.join(scratch, 'package.json'),
    JSON.stringify({ name: 'vsp-library-consumer', private: true, dependencies: deps }),
  );
  await run(
    'npm',
    [
      'install',
      '--offline',
      '--no-audit',
      '--no-fund',
      '--ignore-scripts',
      '--cache',
      `${scratch}/npm-cache`,
    ],
    { cwd: scratch },
  );
}, 120_000);

afterAll(async () => {
  if (scratch) await fs.rm(scratch, { recursive: true, force: true });
});

test('the tarball holds the build and its declarations, not the sources or the tests', async () => {
  const { stdout } = await run('tar', ['-tzf', tarball]);
  const files = stdout.split('\n').filter(Boolean);
  expect(files).toEqual(
    expect.arrayContaining([
      'package/package.json',
      'package/README.md',
      'package/dist/client/index.js',
      'package/dist/client/index.d.ts',
      'package/dist/client/taskClient.d.ts',
      'package/dist/repository/client.d.ts',
      'package/dist/cli/vsp.js',
    ]),
  );
  expect(files.filter((f) => /\.ts$/.test(f) && !f.endsWith('.d.ts'))).toEqual([]);
  expect(files.filter((f) => /^package\/(test|bench|dist\/bench)\//.test(f))).toEqual([]);
  expect(await fs.readlink(installed('zod'))).toContain('node_modules');
});

test('require() from JavaScript gives the clients without loading server-side code', async () => {
  const out = await node(
    'cjs.js',
    `
const vsp = require('vsp');
const loaded = Object.keys(require.cache).map((f) => f.replace(/\\\\/g, '/'));
const lean = require('vsp/tasks');
let deep;
try { require('vsp/dist/repository/server.js'); } catch (err) { deep = err.code; }
let refused;
try { new vsp.TaskClient({ url: 'ftp://example', token: 't' }); } catch (err) { refused = err.message; }
console.log(JSON.stringify({
  exports: Object.keys(vsp).sort(),
  types: [typeof vsp.VspClient, typeof vsp.TaskClient, typeof vsp.RepositoryClient],
  same: lean.TaskClient === vsp.TaskClient,
  loadedServer: loaded.filter((f) => /node_modules\\/(@temporalio\\/worker|better-sqlite3|ssh2|ftp-srv|@node-rs)\\/|\\/dist\\/(repository\\/(server|httpApi|taskApi|metadataDb)|workers|activities|drivers)\\//.test(f)),
  loadedTemporalClient: loaded.some((f) => f.includes('/@temporalio/client/')),
  deep,
  refused,
}));
`,
  );
  const r = JSON.parse(out) as Record<string, unknown>;
  expect(r.exports).toEqual(expect.arrayContaining(['VspClient', 'TaskClient', 'RepositoryClient']));
  expect(r.types).toEqual(['function', 'function', 'function']);
  expect(r.same).toBe(true);
  expect(r.loadedServer).toEqual([]);
  expect(r.loadedTemporalClient).toBe(true);
  // Only the exported entry points: the build's inner modules are not part of the interface.
  expect(r.deep).toBe('ERR_PACKAGE_PATH_NOT_EXPORTED');
  expect(r.refused).toMatch(/must be http:\/\/ or https:\/\//);
});

test("the owners' entry points alone (vsp/tasks, vsp/files) do not load Temporal", async () => {
  const out = await node(
    'lean.js',
    `
const { TaskClient } = require('vsp/tasks');
const { RepositoryClient } = require('vsp/files');
console.log(JSON.stringify({
  types: [typeof TaskClient, typeof RepositoryClient],
  modules: Object.keys(require.cache).filter((f) => f.includes('/node_modules/') && !f.includes('/node_modules/vsp/')),
}));
`,
  );
  expect(JSON.parse(out)).toEqual({ types: ['function', 'function'], modules: [] });
});

test('import from an ES module names the clients', async () => {
  const out = await node(
    'esm.mjs',
    `
import { VspClient, TaskClient, RepositoryClient, TaskSpecError } from 'vsp';
console.log([VspClient, TaskClient, RepositoryClient, TaskSpecError].map((c) => c.name).join(' '));
`,
  );
  expect(out.trim()).toBe('VspClient TaskClient RepositoryClient TaskSpecError');
});

describe('TypeScript', () => {
  const tsc = () =>
    path.join(realpathSync(path.join(repoRoot(), 'node_modules')), 'typescript', 'bin', 'tsc');

  async function typeCheck(source: string): Promise<{ ok: boolean; out: string }> {
    await fs.writeFile(path.join(scratch, 'consumer.ts'), source);
    await fs.writeFile(
      path.join(scratch, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          module: 'node16',
          moduleResolution: 'node16',
          target: 'ES2022',
          strict: true,
          noEmit: true,
          types: ['node'],
          // As most consumers: the dependencies' own declarations are theirs to check.
          skipLibCheck: true,
        },
        files: ['consumer.ts'],
      }),
    );
    try {
      const { stdout } = await run(process.execPath, [tsc(), '-p', scratch], { cwd: scratch });
      return { ok: true, out: stdout };
    } catch (err) {
      return { ok: false, out: String((err as { stdout?: string }).stdout ?? err) };
    }
  }

  // skipLibCheck hides a declaration that does not resolve by making its types `any`: these must not be.
  const header = `
import { VspClient, TaskClient, RepositoryClient, type FileInfo, type TaskDetails } from 'vsp';
import type { OwnerTaskSpec } from 'vsp/tasks';
import type { Client } from '@temporalio/client';
type IsAny<T> = 0 extends 1 & T ? true : false;
export const typed: [IsAny<VspClient['temporal']>, IsAny<OwnerTaskSpec>, IsAny<FileInfo>, IsAny<TaskDetails>] =
  [false, false, false, false];
export const temporal = (v: VspClient): Client => v.temporal;
`;

  test('a consumer using the clients type-checks against the declarations', async () => {
    const r = await typeCheck(`${header}
export async function use(): Promise<[string, FileInfo[]]> {
  const tasks = new TaskClient({ url: 'http://127.0.0.1:8420', token: process.env.VSP_TOKEN ?? '' });
  const { taskId } = await tasks.submit({ command: 'echo hi', inputs: ['in.txt'] });
  const files = await new RepositoryClient({ url: 'http://127.0.0.1:8420', token: 't' }).list('alice');
  return [taskId, files];
}
`);
    expect(r).toEqual({ ok: true, out: '' });
  }, 60_000);

  test('a misuse is refused, naming the declared types', async () => {
    const r = await typeCheck(`${header}
export const wrong = (t: TaskClient) => t.submit({ comand: 'echo hi' });
`);
    expect(r.ok).toBe(false);
    expect(r.out).toMatch(/consumer\.ts.*'comand' does not exist/);
  }, 60_000);
});

test('the package installs the vsp command', async () => {
  const { stdout } = await run(installed('.bin', 'vsp'), ['wait', '--help'], { cwd: scratch });
  expect(stdout).toMatch(/Usage: vsp wait \[options\] <task-id>/);
});
