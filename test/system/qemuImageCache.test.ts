import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ensureAppliance, type Appliance } from '../../drivers/qemu/appliance';
import { ImageCache, sha256File } from '../../storage/imageCache';

const MiB = 1024 * 1024;

describe('ImageCache (real qemu-img)', () => {
  let appliance: Appliance;
  let work: string;
  let cache: ImageCache;
  let cacheDir: string;

  beforeAll(async () => {
    appliance = await ensureAppliance();
  });

  beforeEach(async () => {
    work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-imgcache-'));
    cacheDir = path.join(work, 'images');
    cache = new ImageCache({ dir: cacheDir, maxVirtualBytes: 512 * MiB });
  });

  afterEach(async () => {
    await fs.rm(work, { recursive: true, force: true });
  });

  const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { stdio: 'pipe' });

  test('caches the appliance base by content hash, read-only, and hits the cache afterwards', async () => {
    const img = await cache.ensureFromFile(appliance.root.path, appliance.root.sha256);
    expect(img).toMatchObject({ sha256: appliance.root.sha256, format: 'qcow2' });
    expect(img.path).toBe(path.join(cacheDir, `${appliance.root.sha256}.qcow2`));
    expect((await fs.stat(img.path)).mode & 0o222).toBe(0);
    expect(await sha256File(img.path)).toBe(appliance.root.sha256);
    expect(await cache.get(appliance.root.sha256)).toEqual(img);
    // A hit does not read the source at all.
    expect(await cache.ensureFromFile('/nonexistent', appliance.root.sha256)).toEqual(img);
    expect((await fs.readdir(cacheDir)).sort()).toEqual([`${img.sha256}.json`, `${img.sha256}.qcow2`]);
  });

  test('rejects a content hash mismatch', async () => {
    await expect(cache.ensureFromFile(appliance.root.path, 'a'.repeat(64))).rejects.toThrow(
      /content hash .* expected a{64}/,
    );
    expect(await cache.get('a'.repeat(64))).toBeUndefined();
  });

  test('accepts a raw ext4 image and a qcow2 whose backing file is in the cache', async () => {
    const raw = path.join(work, 'disk.raw');
    execFileSync('mke2fs', ['-q', '-t', 'ext4', raw, '16M'], { stdio: 'pipe' });
    const base = await cache.ensureFromFile(raw);
    expect(base).toMatchObject({ format: 'raw', virtualBytes: 16 * MiB });
    const child = path.join(work, 'child.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base.path, '-F', 'raw', child);
    const cached = await cache.ensureFromFile(child);
    expect(cached.backingFile).toBe(base.path);
  });

  test('rejects a file that is not an image', async () => {
    const text = path.join(work, 'notes.txt');
    await fs.writeFile(text, 'hello, this is not a disk\n');
    await expect(cache.ensureFromFile(text)).rejects.toThrow(/not a disk image/);
    const zeros = path.join(work, 'zeros.img');
    await fs.writeFile(zeros, Buffer.alloc(MiB));
    await expect(cache.validate(zeros)).rejects.toThrow(/raw image must hold an ext4 file system/);
  });

  test('rejects a truncated qcow2', async () => {
    const full = path.join(work, 'full.qcow2');
    qemuImg('convert', '-f', 'qcow2', '-O', 'qcow2', appliance.root.path, full);
    const { size } = await fs.stat(full);
    await fs.truncate(full, Math.floor(size / 2));
    await expect(cache.ensureFromFile(full)).rejects.toThrow(/damaged or truncated/);
    expect(await fs.readdir(cacheDir)).toEqual([]);
  });

  test('rejects a backing file outside the cache', async () => {
    const outside = path.join(work, 'outside.raw');
    execFileSync('mke2fs', ['-q', '-t', 'ext4', outside, '8M'], { stdio: 'pipe' });
    const img = path.join(work, 'evil.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', outside, '-F', 'raw', img);
    await expect(cache.ensureFromFile(img)).rejects.toThrow(
      /backing file .*outside\.raw outside the image cache/,
    );
  });

  test('rejects an image larger than the maximum and formats other than qcow2/raw', async () => {
    const big = path.join(work, 'big.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', big, '2G');
    await expect(cache.validate(big)).rejects.toThrow(
      /virtual size of 2048 MiB, more than the maximum of 512 MiB/,
    );
    const vdi = path.join(work, 'disk.vdi');
    qemuImg('create', '-q', '-f', 'vdi', vdi, '16M');
    await expect(cache.validate(vdi)).rejects.toThrow(/format vdi: only qcow2 and raw/);
  });
});
