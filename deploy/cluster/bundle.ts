import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { runCommand } from '../../drivers/qemu/runCommand';

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
    '*.map',
    '*.d.ts',
  ];
}

/** Temporal's name of this machine's platform (the hosts run the same one). */
export function currentPlatformTriple(arch = process.arch, platform = process.platform): string {
  const cpu = arch === 'x64' ? 'x86_64' : arch === 'arm64' ? 'aarch64' : arch;
  return platform === 'linux' ? `${cpu}-unknown-linux-gnu` : `${cpu}-${platform}`;
}

/**
 * The top-level folders of the production packages, relative to the project (`node_modules/zod`, ...):
 * `npm ls --omit=dev` lists the installed tree; nested packages come with their parent's folder.
 */
export function productionPackagePaths(npmLsParseable: string, projectDir: string): string[] {
  const rel = npmLsParseable
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean)
    .map((p) => path.relative(projectDir, p))
    .filter((p) => p.startsWith('node_modules' + path.sep));
  const sorted = [...new Set(rel)].sort();
  return sorted.filter((p) => !sorted.some((q) => q !== p && p.startsWith(q + path.sep)));
}

export async function buildBundle(projectDir: string): Promise<Bundle> {
  const entry = path.join(projectDir, 'dist', 'workers', 'hostWorker.js');
  if (!(await fs.stat(entry).catch(() => undefined)))
    throw new Error(`${entry} is missing: run 'npm ci && npm run build' in ${projectDir} first`);
  let listing: string;
  try {
    listing = (
      await runCommand('npm', ['--prefix', projectDir, 'ls', '--omit=dev', '--all', '--parseable'], {
        timeoutMs: 60_000,
      })
    ).stdout;
  } catch (err) {
    throw new Error(`cannot list the production packages of ${projectDir}: run 'npm ci' there`, {
      cause: err,
    });
  }
  const releases = path.join(projectDir, 'node_modules', '@temporalio', 'core-bridge', 'releases');
  const platform = currentPlatformTriple();
  const others = (await fs.readdir(releases).catch(() => [])).filter((p) => p !== platform);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-bundle-'));
  const file = path.join(dir, 'vsp-release.tar.gz');
  const list = path.join(dir, 'files');
  const exclude = path.join(dir, 'exclude');
  try {
    await fs.writeFile(
      list,
      [...PROJECT_PATHS, ...productionPackagePaths(listing, projectDir)].join('\n') + '\n',
    );
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
