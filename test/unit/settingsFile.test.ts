import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { formatSettings, loadSettings, parseSettings, settingsFilePath } from '../../cli/settingsFile';

let dir: string;
beforeEach(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'vsp-settings-'))));
afterEach(() => rmSync(dir, { recursive: true, force: true }));

test('the default file is ~/.config/vsp/env (XDG_CONFIG_HOME first); VSP_ENV_FILE names another or none', () => {
  expect(settingsFilePath({ HOME: '/home/ann' })).toBe('/home/ann/.config/vsp/env');
  expect(settingsFilePath({ HOME: '/home/ann', XDG_CONFIG_HOME: '/cfg' })).toBe('/cfg/vsp/env');
  expect(settingsFilePath({ HOME: '/home/ann', VSP_ENV_FILE: '/x/env' })).toBe('/x/env');
  expect(settingsFilePath({ HOME: '/home/ann', VSP_ENV_FILE: '' })).toBeUndefined();
});

test('what the demo writes is read back; the environment wins over the file', () => {
  const file = path.join(dir, 'env');
  const text = formatSettings(
    { VSP_REPOSITORY_URL: 'http://127.0.0.1:8420', VSP_TOKEN: 'vsp_abc', TEMPORAL_ADDRESS: '127.0.0.1:7233' },
    'written by the demo\nremoved when it stops',
  );
  expect(text.split('\n').slice(0, 2)).toEqual(['# written by the demo', '# removed when it stops']);
  writeFileSync(file, text, { mode: 0o600 });
  const env: NodeJS.ProcessEnv = { VSP_ENV_FILE: file, TEMPORAL_ADDRESS: 'elsewhere:7233' };
  expect(loadSettings(env)).toBe(file);
  expect(env).toMatchObject({
    VSP_REPOSITORY_URL: 'http://127.0.0.1:8420',
    VSP_TOKEN: 'vsp_abc',
    TEMPORAL_ADDRESS: 'elsewhere:7233',
  });
  expect(loadSettings({ VSP_ENV_FILE: path.join(dir, 'missing') })).toBeUndefined();
});

test('a line that is not a known KEY=value is named; a token others can read is refused', () => {
  expect(parseSettings('export VSP_OWNER=ann\n\n# note\n', 'f')).toEqual({ VSP_OWNER: 'ann' });
  expect(() => parseSettings('VSP_OWNER=ann\nPATH=/tmp\n', 'f')).toThrow(/^f line 2: expected KEY=value/);
  const file = path.join(dir, 'env');
  writeFileSync(file, 'VSP_TOKEN=vsp_abc\n');
  chmodSync(file, 0o644);
  expect(() => loadSettings({ VSP_ENV_FILE: file })).toThrow(`others can read it: chmod 600 ${file}`);
});
