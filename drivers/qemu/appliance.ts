import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { runCommand } from '../../lib/runCommand';

/** The guest appliance built by deploy/guest/build-appliance.sh: kernel, initramfs, busybox root disk. */
export interface Appliance {
  version: string;
  kernelVersion: string;
  /** Absolute paths. */
  vmlinuz: string;
  /** The kernel unpacked to ELF with a PVH entry (QEMU's microvm starts it); absent when the build could not. */
  vmlinux?: string;
  initrd: string;
  root: { path: string; sha256: string; format: 'qcow2' | 'raw' };
}

interface Manifest {
  version: string;
  kernelVersion: string;
  files: {
    vmlinuz: string;
    vmlinux?: string;
    initrd: string;
    root: { path: string; sha256: string; format: string };
  };
}

/** The source tree: two levels up from this file, or three when it runs compiled from dist/. */
const REPO_ROOT =
  [path.resolve(__dirname, '../..'), path.resolve(__dirname, '../../..')].find((dir) =>
    existsSync(path.join(dir, 'deploy', 'guest', 'build-appliance.sh')),
  ) ?? path.resolve(__dirname, '../..');
export const DEFAULT_APPLIANCE_DIR = path.join(REPO_ROOT, '.vsp', 'appliance');
const BUILD_SCRIPT = path.join(REPO_ROOT, 'deploy', 'guest', 'build-appliance.sh');
const BUILD_TIMEOUT_MS = 10 * 60_000;

async function readManifest(versionDir: string): Promise<Appliance> {
  const file = path.join(versionDir, 'manifest.json');
  const m = JSON.parse(await fs.readFile(file, 'utf8')) as Manifest;
  const fmt = m.files?.root?.format;
  if (
    !m.version ||
    !m.files?.vmlinuz ||
    !m.files.initrd ||
    !m.files.root?.path ||
    !/^[0-9a-f]{64}$/.test(m.files.root.sha256)
  )
    throw new Error(`appliance manifest ${file} is incomplete`);
  if (fmt !== 'qcow2' && fmt !== 'raw')
    throw new Error(`appliance manifest ${file}: unknown root format ${fmt}`);
  return {
    version: m.version,
    kernelVersion: m.kernelVersion,
    vmlinuz: path.join(versionDir, m.files.vmlinuz),
    ...(m.files.vmlinux ? { vmlinux: path.join(versionDir, m.files.vmlinux) } : {}),
    initrd: path.join(versionDir, m.files.initrd),
    root: { path: path.join(versionDir, m.files.root.path), sha256: m.files.root.sha256, format: fmt },
  };
}

/** Loads the newest built appliance under `dir`; tells the user how to build one if there is none. */
export async function loadAppliance(dir = DEFAULT_APPLIANCE_DIR): Promise<Appliance> {
  let candidates: { dir: string; mtimeMs: number }[] = [];
  try {
    for (const name of await fs.readdir(dir)) {
      if (name.startsWith('.')) continue;
      const manifest = path.join(dir, name, 'manifest.json');
      const st = await fs.stat(manifest).catch(() => undefined);
      if (st) candidates.push({ dir: path.join(dir, name), mtimeMs: st.mtimeMs });
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  candidates = candidates.sort((a, b) => b.mtimeMs - a.mtimeMs);
  if (candidates.length === 0)
    throw new Error(
      `no guest appliance in ${dir}: build it with 'bash ${path.relative(process.cwd(), BUILD_SCRIPT)} ${dir}'`,
    );
  return readManifest(candidates[0].dir);
}

/** Builds the appliance if its inputs changed (the script is cached and quick otherwise), then loads it. */
export async function ensureAppliance(dir = DEFAULT_APPLIANCE_DIR): Promise<Appliance> {
  const { stdout } = await runCommand('bash', [BUILD_SCRIPT, dir], { timeoutMs: BUILD_TIMEOUT_MS });
  const versionDir = stdout.trim().split('\n').pop() ?? '';
  if (!versionDir) throw new Error(`${BUILD_SCRIPT} printed no appliance folder`);
  return readManifest(versionDir);
}
