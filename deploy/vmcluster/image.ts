import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';

import { runCommand } from '../../lib/runCommand';
import { createLogger } from '../../logging/logger';
import { repoRoot } from '../devcluster/tools';
import { HOST_NAMES, type ClusterConfig } from './config';
import { pathExists } from '../../lib/pathExists';
import { pruneUnused, touch } from './files';
import { withLock } from './lock';

const log = createLogger('vmcluster.image');

// The sources, also when this runs compiled from dist/.
const HERE = path.join(repoRoot(), 'deploy', 'vmcluster');
const BUILD_SCRIPT = path.join(HERE, 'build-image.sh');
const OVERLAY = path.join(HERE, 'overlay');
/** mmdebstrap plus mkfs takes 1-3 min; a slow mirror or a loaded machine several times that. */
const BUILD_TIMEOUT_MS = 30 * 60_000;
const PROGRESS_EVERY_MS = 30_000;
/** Images unused this long are removed (each is ~1 GiB); others may belong to another checkout. */
const UNUSED_IMAGE_MS = 3 * 24 * 3600_000;

/** The built image: what QEMU boots (Xen and dom0's kernel from `boot/`, dom0's root disk). */
export interface Dom0Image {
  hash: string;
  dir: string;
  disk: string;
  xen: string;
  kernel: string;
  initrd: string;
}

/** The cluster's root key (the inventory's identity file) and each host's fixed ssh host key. */
export interface ClusterKeys {
  dir: string;
  identityFile: string;
  /** Public host key line per host name, e.g. 'ssh-ed25519 AAAA...'. */
  hostKeys: Record<string, string>;
}

async function keygen(file: string, comment: string): Promise<void> {
  if (await pathExists(file)) return;
  await fs.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
  await runCommand('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', comment, '-f', file]);
}

/**
 * The cluster's keys, made once per machine: root's key pair (authorized on every dom0, and dom0 -> dom0
 * for `xl migrate`) and a host key pair per possible host, all baked into the image so a restored warm
 * snapshot keeps the host keys the inventory records. Throw-away test keys: never for real hosts.
 */
export async function ensureKeys(c: ClusterConfig): Promise<ClusterKeys> {
  await fs.mkdir(c.keysDir, { recursive: true, mode: 0o700 });
  const identityFile = path.join(c.keysDir, 'id_ed25519');
  await keygen(identityFile, 'vsp-vmcluster');
  const hostKeys: Record<string, string> = {};
  for (const name of HOST_NAMES) {
    const key = path.join(c.keysDir, 'hostkeys', name, 'ssh_host_ed25519_key');
    await keygen(key, `vsp-dom0-${name}`);
    hostKeys[name] = (await fs.readFile(`${key}.pub`, 'utf8')).trim().split(/\s+/).slice(0, 2).join(' ');
  }
  return { dir: c.keysDir, identityFile, hostKeys };
}

async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await fs.readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...(await listFiles(p)));
    else out.push(p);
  }
  return out.sort();
}

function hashFile(h: ReturnType<typeof createHash>, file: string): Promise<void> {
  return new Promise((resolve, reject) => {
    createReadStream(file)
      .on('data', (d) => h.update(d))
      .on('end', resolve)
      .on('error', reject);
  });
}

/** What the image is made of: the build script, the overlay (paths, modes, contents), the keys, node. */
async function inputsHash(keys: ClusterKeys, nodeBinary: string): Promise<string> {
  const h = createHash('sha256');
  const inputs = [BUILD_SCRIPT, ...(await listFiles(OVERLAY)), ...(await listFiles(keys.dir)), nodeBinary];
  for (const file of inputs) {
    const st = await fs.stat(file);
    h.update(`${path.relative(HERE, file)}\0${st.mode & 0o777}\0`);
    await hashFile(h, file);
  }
  return h.digest('hex').slice(0, 16);
}

function imageAt(hash: string, dir: string): Dom0Image {
  return {
    hash,
    dir,
    disk: path.join(dir, 'dom0.qcow2'),
    xen: path.join(dir, 'boot', 'xen'),
    kernel: path.join(dir, 'boot', 'vmlinuz'),
    initrd: path.join(dir, 'boot', 'initrd.img'),
  };
}

/** The cached image a running cluster was booted from (its state records the hash). */
export async function builtImage(c: ClusterConfig, hash: string): Promise<Dom0Image> {
  const image = imageAt(hash, path.join(c.cacheDir, 'images', hash));
  if (!(await pathExists(path.join(image.dir, 'complete'))))
    throw new Error(`the cluster's dom0 image ${hash} is no longer in ${path.dirname(image.dir)}`);
  return image;
}

/**
 * The dom0 image for these keys and this machine's node, built when the cache has none (needs root and the
 * Debian mirror). Builds go to a scratch folder renamed into place when complete, under a lock, so a
 * crashed or concurrent build never leaves a half image where a boot would find it.
 */
export async function ensureImage(c: ClusterConfig, keys: ClusterKeys): Promise<Dom0Image> {
  const nodeBinary = await fs.realpath(process.execPath);
  const hash = await inputsHash(keys, nodeBinary);
  const imagesDir = path.join(c.cacheDir, 'images');
  const image = imageAt(hash, path.join(imagesDir, hash));
  const complete = path.join(image.dir, 'complete');
  if (await pathExists(complete)) {
    await touch(image.dir);
    return image;
  }
  return withLock(
    path.join(imagesDir, `${hash}.lock`),
    'dom0 image build',
    log,
    BUILD_TIMEOUT_MS,
    async () => {
      if (await pathExists(complete)) return image;
      const scratch = path.join(imagesDir, `${hash}.build-${process.pid}`);
      await fs.rm(scratch, { recursive: true, force: true });
      await fs.rm(image.dir, { recursive: true, force: true });
      await fs.mkdir(scratch, { recursive: true });
      const started = Date.now();
      log.info({ hash, dir: image.dir }, 'building the dom0 image (mmdebstrap, 1-3 min)');
      try {
        await runBuild(scratch, keys.dir, nodeBinary);
        await fs.writeFile(path.join(scratch, 'complete'), `${new Date().toISOString()}\n`);
        await fs.rename(scratch, image.dir);
      } catch (err) {
        await fs.rm(scratch, { recursive: true, force: true });
        throw new Error('building the dom0 image failed', { cause: err });
      }
      log.info({ hash, seconds: Math.round((Date.now() - started) / 1000) }, 'dom0 image built');
      await pruneUnused(imagesDir, UNUSED_IMAGE_MS, log);
      return image;
    },
  );
}

/** Runs build-image.sh, relaying its progress lines as log entries and keeping its output in a log file. */
async function runBuild(outDir: string, keysDir: string, nodeBinary: string): Promise<void> {
  const logFile = path.join(path.dirname(outDir), `${path.basename(outDir)}.log`);
  const out = await fs.open(logFile, 'w');
  const child = spawn('bash', [BUILD_SCRIPT, outDir, keysDir, nodeBinary], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  for (const stream of [child.stdout, child.stderr]) {
    readline.createInterface({ input: stream }).on('line', (line) => {
      void out.write(`${line}\n`);
      lines.push(line);
      if (lines.length > 40) lines.shift();
      if (line.startsWith('build-image:')) log.info({ step: line.slice(13) }, 'dom0 image build');
    });
  }
  const started = Date.now();
  const progress = setInterval(
    () => log.info({ seconds: Math.round((Date.now() - started) / 1000) }, 'dom0 image build still running'),
    PROGRESS_EVERY_MS,
  );
  const timer = setTimeout(() => child.kill('SIGKILL'), BUILD_TIMEOUT_MS);
  try {
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
      child.once('error', reject);
      child.once('exit', (c, s) => resolve([c, s]));
    });
    if (code !== 0)
      throw new Error(
        `build-image.sh ${signal ? `killed by ${signal}` : `exited with ${code}`} (log: ${logFile}):\n${lines.join('\n')}`,
      );
  } finally {
    clearInterval(progress);
    clearTimeout(timer);
    await out.close();
  }
}
