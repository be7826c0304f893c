import { createHash } from 'node:crypto';
import { createReadStream, existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { runCommand } from '../../lib/runCommand';

/**
 * The release a deploy copies to every host: the compiled project (dist/), its package files, the
 * scripts the hosts run (deploy/production, deploy/guest) and the production node_modules (hosts have no
 * registry access), as one gzipped tarball. The tarball is reproducible (sorted, fixed times and
 * owners, gzip without a timestamp), so its sha256 names its content: a host that already has a release
 * with that hash receives nothing.
 */

export interface Bundle {
  file: string;
  sha256: string;
  bytes: number;
  dispose(): Promise<void>;
}

/** Paths of the project the hosts need, besides the production packages. */
const PROJECT_PATHS = ['dist', 'package.json', 'package-lock.json', 'deploy/production', 'deploy/guest'];

/**
 * What no host needs from the production packages (tar patterns): native binaries of other platforms
 * (Temporal's core bridge ships one 27 MB binary per platform) and the sources they were built from.
 */
export function excludePatterns(otherPlatforms: string[]): string[] {
  return [
    ...otherPlatforms.map((p) => `node_modules/@temporalio/core-bridge/releases/${p}`),
    'node_modules/@temporalio/core-bridge/sdk-core',
    'node_modules/better-sqlite3/deps',
    'node_modules/better-sqlite3/src',
    'node_modules/better-sqlite3/build/Release/obj',
    'node_modules/better-sqlite3/build/Release/obj.target',
    // Node never loads these: source maps, TypeScript sources and declarations, documentation.
    '*.map',
    'node_modules/*.ts',
    'node_modules/*.md',
  ];
}

/** Temporal's name of this machine's platform (the hosts run the same one). */
export function currentPlatformTriple(arch = process.arch, platform = process.platform): string {
  const cpu = arch === 'x64' ? 'x86_64' : arch === 'arm64' ? 'aarch64' : arch;
  return platform === 'linux' ? `${cpu}-unknown-linux-gnu` : `${cpu}-${platform}`;
}

interface LockEntry {
  dev?: boolean;
  devOptional?: boolean;
  optional?: boolean;
}

/**
 * The top-level folders of the production packages (`node_modules/zod`, ...), from package-lock.json:
 * every installed package not flagged dev; nested packages come with their parent's folder. Optional
 * packages that are not installed (other platforms' binaries) are skipped; a missing required one is an
 * error, since the hosts cannot fetch it.
 */
export function productionPackagePaths(
  lock: { packages?: Record<string, LockEntry> },
  installed: (dir: string) => boolean,
): string[] {
  const missing: string[] = [];
  const paths: string[] = [];
  for (const [dir, entry] of Object.entries(lock.packages ?? {})) {
    if (!dir.startsWith('node_modules/') || entry.dev || entry.devOptional) continue;
    if (installed(dir)) paths.push(dir);
    else if (!entry.optional) missing.push(dir);
  }
  if (missing.length > 0)
    throw new Error(
      `production packages are not installed (${missing.slice(0, 5).join(', ')}): run 'npm ci'`,
    );
  const sorted = paths.sort();
  return sorted.filter((p) => !sorted.some((q) => q !== p && p.startsWith(`${q}/`)));
}

export async function buildBundle(projectDir: string): Promise<Bundle> {
  const entry = path.join(projectDir, 'dist', 'workers', 'hostWorker.js');
  if (!(await fs.stat(entry).catch(() => undefined)))
    throw new Error(`${entry} is missing: run 'npm ci && npm run build' in ${projectDir} first`);
  let lock: { packages?: Record<string, LockEntry> };
  try {
    lock = JSON.parse(await fs.readFile(path.join(projectDir, 'package-lock.json'), 'utf8'));
  } catch (err) {
    throw new Error(`cannot read ${projectDir}/package-lock.json`, { cause: err });
  }
  const packages = productionPackagePaths(lock, (dir) =>
    existsSync(path.join(projectDir, dir, 'package.json')),
  );
  const releases = path.join(projectDir, 'node_modules', '@temporalio', 'core-bridge', 'releases');
  const platform = currentPlatformTriple();
  const others = (await fs.readdir(releases).catch(() => [])).filter((p) => p !== platform);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-bundle-'));
  const file = path.join(dir, 'vsp-release.tar.gz');
  const list = path.join(dir, 'files');
  const exclude = path.join(dir, 'exclude');
  try {
    await fs.writeFile(list, [...PROJECT_PATHS, ...packages].join('\n') + '\n');
    await fs.writeFile(exclude, excludePatterns(others).join('\n') + '\n');
    await runCommand(
      'bash',
      [
        '-c',
        'set -o pipefail; tar -C "$1" --create --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner ' +
          '--mode=go-w,u+rw --format=gnu --exclude-from="$3" --files-from="$2" | gzip -n -6 > "$4"',
        'bundle',
        projectDir,
        list,
        exclude,
        file,
      ],
      { timeoutMs: 10 * 60_000 },
    );
    const bytes = (await fs.stat(file)).size;
    return {
      file,
      sha256: await sha256File(file),
      bytes,
      dispose: () => fs.rm(dir, { recursive: true, force: true }),
    };
  } catch (err) {
    await fs.rm(dir, { recursive: true, force: true });
    throw new Error('cannot build the release tarball', { cause: err });
  }
}

export async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}
