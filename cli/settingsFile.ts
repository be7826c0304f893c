import { readFileSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/**
 * `vsp`'s settings file: `KEY=value` lines (blank lines and `# comments` allowed) for the environment
 * variables below, as the demo writes them (like kind writing a kubeconfig). A variable already set in
 * the environment wins over the file. The file is `$VSP_ENV_FILE`, else `$XDG_CONFIG_HOME/vsp/env`
 * (`~/.config/vsp/env`); `VSP_ENV_FILE=` (empty) reads none. A missing file is no error.
 */
export const SETTINGS_KEYS = [
  'VSP_REPOSITORY_URL',
  'VSP_TOKEN',
  'VSP_OWNER',
  'TEMPORAL_ADDRESS',
  'TEMPORAL_NAMESPACE',
] as const;

export type SettingsKey = (typeof SETTINGS_KEYS)[number];

/** The settings file `vsp` reads, or undefined when `VSP_ENV_FILE` is set empty. */
export function settingsFilePath(env: NodeJS.ProcessEnv = process.env): string | undefined {
  if (env.VSP_ENV_FILE !== undefined) return env.VSP_ENV_FILE || undefined;
  const config = env.XDG_CONFIG_HOME || path.join(env.HOME || os.homedir(), '.config');
  return path.join(config, 'vsp', 'env');
}

/** The file's settings; a line that is not `KEY=value` with a known key is an error naming it. */
export function parseSettings(text: string, file: string): Partial<Record<SettingsKey, string>> {
  const out: Partial<Record<SettingsKey, string>> = {};
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim().replace(/^export\s+/, '');
    if (line === '' || line.startsWith('#')) return;
    const eq = line.indexOf('=');
    const key = eq < 0 ? line : line.slice(0, eq);
    if (eq < 0 || !(SETTINGS_KEYS as readonly string[]).includes(key))
      throw new Error(
        `${file} line ${i + 1}: expected KEY=value with KEY one of ${SETTINGS_KEYS.join(', ')}, got ${JSON.stringify(raw.slice(0, 60))}`,
      );
    out[key as SettingsKey] = line.slice(eq + 1);
  });
  return out;
}

/** The file's text for `values` (what the demo writes), under a comment saying who wrote it. */
export function formatSettings(values: Partial<Record<SettingsKey, string>>, comment: string): string {
  const lines = SETTINGS_KEYS.filter((k) => values[k] !== undefined).map((k) => `${k}=${values[k]}`);
  return `${comment
    .split('\n')
    .map((l) => `# ${l}`)
    .join('\n')}\n${lines.join('\n')}\n`;
}

/**
 * Fills the unset variables of `env` from the settings file; returns the file read, if any. A file with a
 * token that others can read is refused, as ssh refuses such a key.
 */
export function loadSettings(env: NodeJS.ProcessEnv = process.env): string | undefined {
  const file = settingsFilePath(env);
  if (!file) return undefined;
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new Error(`cannot read the settings file ${file}`, { cause: err });
  }
  const settings = parseSettings(text, file);
  if (settings.VSP_TOKEN !== undefined && (statSync(file).mode & 0o077) !== 0)
    throw new Error(`${file} holds a token but others can read it: chmod 600 ${file}`);
  for (const [k, v] of Object.entries(settings)) if (!env[k]) env[k] = v;
  return file;
}
