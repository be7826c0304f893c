import { promises as fs } from 'node:fs';
import path from 'node:path';
import { formatSettings, settingsFilePath } from '../../cli/settingsFile';

/** Says `vsp` is reached through the settings file; the file is the demo's to remove only if unchanged. */
const SETTINGS_COMMENT = 'written by the VSP demo (npm start) for vsp; removed when the demo stops';

/**
 * Writes the settings file `vsp` reads by default, unless one that the demo did not write is there: that
 * one is left alone and the demo's goes to `fallback` (VSP_ENV_FILE then names it). Returns the file and
 * how to remove it.
 */
export async function writeDemoSettings(
  values: Parameters<typeof formatSettings>[0],
  fallback: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<{ file: string; byDefault: boolean; remove: () => Promise<void> }> {
  const text = formatSettings(values, SETTINGS_COMMENT);
  const standard = settingsFilePath(env);
  const existing = standard ? await fs.readFile(standard, 'utf8').catch(() => undefined) : undefined;
  const byDefault = standard !== undefined && (existing === undefined || existing.includes(SETTINGS_COMMENT));
  const file = byDefault ? standard : fallback;
  await fs.mkdir(path.dirname(file), { recursive: true });
  await fs.writeFile(file, text, { mode: 0o600 });
  await fs.chmod(file, 0o600);
  return {
    file,
    byDefault,
    remove: async () => {
      if ((await fs.readFile(file, 'utf8').catch(() => '')) === text) await fs.rm(file, { force: true });
    },
  };
}
