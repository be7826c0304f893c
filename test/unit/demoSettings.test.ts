import { mkdtempSync, promises as fs, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadSettings } from '../../cli/settingsFile';
import { writeDemoSettings } from '../../deploy/devcluster/demoSettings';

let dir: string;
beforeEach(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'vsp-demo-settings-'))));
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const values = { VSP_REPOSITORY_URL: 'http://127.0.0.1:8420', VSP_TOKEN: 'vsp_demo' };

test('the demo writes the file vsp reads by default (0600), and removes it when it stops', async () => {
  const env = { XDG_CONFIG_HOME: dir };
  const written = await writeDemoSettings(values, path.join(dir, 'fallback'), env);
  expect(written).toMatchObject({ file: path.join(dir, 'vsp', 'env'), byDefault: true });
  expect(statSync(written.file).mode & 0o777).toBe(0o600);
  const vspEnv: NodeJS.ProcessEnv = { ...env };
  expect(loadSettings(vspEnv)).toBe(written.file);
  expect(vspEnv).toMatchObject(values);
  await written.remove();
  await expect(fs.stat(written.file)).rejects.toThrow(/ENOENT/);
});

test("a settings file the demo did not write is left alone; the demo's goes beside it", async () => {
  const own = path.join(dir, 'vsp', 'env');
  await fs.mkdir(path.dirname(own), { recursive: true });
  await fs.writeFile(own, 'VSP_OWNER=me\n', { mode: 0o600 });
  const fallback = path.join(dir, 'demo', 'vsp.env');
  const written = await writeDemoSettings(values, fallback, { XDG_CONFIG_HOME: dir });
  expect(written).toMatchObject({ file: fallback, byDefault: false });
  expect(await fs.readFile(own, 'utf8')).toBe('VSP_OWNER=me\n');
  await written.remove();
  expect(await fs.readFile(own, 'utf8')).toBe('VSP_OWNER=me\n');
  await expect(fs.stat(fallback)).rejects.toThrow(/ENOENT/);
});
