import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { ApplicationFailure } from '@temporalio/activity';
import type { DriverBinding, ImageFetch } from '../activities/host/hostDeps';
import type { HostConfig } from '../config/workerConfig';
import { probeAccelerator } from '../drivers/qemu/accelerator';
import { ensureAppliance, type Appliance } from '../drivers/qemu/appliance';
import { resolveQemuAccount } from '../drivers/qemu/qemuAccount';
import { QemuDriver } from '../drivers/qemu/qemuDriver';
import { ProcessDriver } from '../drivers/process/processDriver';
import { TaskAccounts } from '../drivers/process/taskAccounts';
import { checkToolstack, xlRunner } from '../drivers/xen/xl';
import { DEFAULT_CONSOLE_LOG_DIR } from '../drivers/xen/xenConsole';
import { XenDriver } from '../drivers/xen/xenDriver';
import { createLogger, describeError } from '../logging/logger';
import { RepositoryError, type RepositoryClient } from '../repository/client';
import { DirectoryStaging } from '../storage/directoryStaging';
import { DiskImageStaging } from '../storage/diskImageStaging';
import { GuestDiskTools } from '../storage/guestDiskTools';
import { BASE_IMAGE_PREFIX, imageRepoPath } from '../spec/taskSpec';
import { ImageCache, InvalidImageError } from '../storage/imageCache';
import { ImageNames } from '../storage/imageNames';
import type { VmStore } from '../storage/vmStore';

const log = createLogger('worker.drivers');

/** The drivers a host offers, from its configuration (VSP_DRIVERS). */
export async function createDriverBindings(
  config: HostConfig,
  store: VmStore,
  repository: RepositoryClient,
): Promise<Record<string, DriverBinding>> {
  const bindings: Record<string, DriverBinding> = {};
  // Shared by the VM drivers: one appliance and one image cache per host.
  let vmImages: VmImages | undefined;
  // One uid range for process tasks and for the tools that read guest-written disks.
  const accounts = new TaskAccounts(config.processUids);
  for (const name of config.drivers) {
    if (name === 'process') {
      bindings.process = {
        driver: new ProcessDriver({
          store,
          hostName: config.host,
          accounts,
        }),
        staging: new DirectoryStaging(),
      };
    } else if (name === 'qemu') {
      vmImages ??= await vmImagesOf(config, store, repository);
      // Probe now (bounded, cached per process) so that no task waits for it at its VM's start.
      if (config.accel === 'auto') await probeAccelerator(vmImages.appliance.vmlinuz);
      bindings.qemu = {
        driver: new QemuDriver({
          store,
          hostName: config.host,
          appliance: vmImages.appliance,
          accel: config.accel,
          tscKhz: config.tscKhz,
          cluster: config.clusterStorage,
          netns: config.netns,
          vmNetwork: config.vmNetwork,
          qemuUser: config.qemuUser,
          migrationTlsDir: config.migrationTlsDir,
          remoteDisksUnder: config.qemuRemoteDisks === 'mounts' ? config.mountRoot : undefined,
          snapshots: config.qemuSnapshots === 'on',
        }),
        staging: new DiskImageStaging(new GuestDiskTools(accounts)),
        resolveImage: vmImages.resolveImage,
      };
    } else {
      // Before the appliance (which may have to be built): a host without a working xl fails at once.
      await checkToolstack(xlRunner(), config.host, DEFAULT_CONSOLE_LOG_DIR);
      vmImages ??= await vmImagesOf(config, store, repository);
      bindings.xen = {
        driver: new XenDriver({
          store,
          hostName: config.host,
          appliance: vmImages.appliance,
          mountRoot: config.mountRoot,
          cluster: config.clusterStorage,
          vmNetwork: config.vmNetwork,
          guestType: config.xenGuestType,
          guestCpus: config.xenGuestCpus,
          diskOwner: await resolveQemuAccount(config.qemuUser),
        }),
        staging: new DiskImageStaging(new GuestDiskTools(accounts)),
        resolveImage: vmImages.resolveImage,
      };
    }
  }
  return bindings;
}

/** The accelerator this host's VMs get (its inventory reports it); probed once per process. */
export async function acceleratorOf(config: HostConfig): Promise<string | undefined> {
  if (config.drivers.includes('xen')) return 'xen';
  if (!config.drivers.includes('qemu')) return undefined;
  if (config.accel !== 'auto') return config.accel;
  return probeAccelerator((await ensureAppliance(config.applianceDir)).vmlinuz);
}

interface VmImages {
  appliance: Appliance;
  resolveImage: NonNullable<DriverBinding['resolveImage']>;
}

/** The appliance the VM drivers boot, and the base image of a task: the appliance's root by default. */
async function vmImagesOf(
  config: HostConfig,
  store: VmStore,
  repository: RepositoryClient,
): Promise<VmImages> {
  const appliance = await ensureAppliance(config.applianceDir);
  const cache = new ImageCache({ dir: store.imagesDir, maxVirtualBytes: config.maxImageBytes });
  const names = new ImageNames(store.imagesDir);
  // Placement prefers hosts that have a task's image: the provider's images are known by name.
  const named = (image: string, cached: string) => {
    names
      .record(image, path.basename(cached).split('.')[0])
      .catch((err: unknown) =>
        log.warn({ image, err: describeError(err) }, 'could not record the name of a cached image'),
      );
    return cached;
  };
  return {
    appliance,
    resolveImage: async (owner, image, fetch) => {
      if (image === 'default')
        return named(image, (await cache.ensureFromFile(appliance.root.path, appliance.root.sha256)).path);
      // The host's own credential reads the provider's base images only; an owner's image, the task's.
      if (image.startsWith(BASE_IMAGE_PREFIX))
        return named(image, await customerImage(cache, store, { ...fetch, repository }, owner, image));
      return customerImage(cache, store, fetch, owner, image);
    },
  };
}

/**
 * An owner's own image, or a provider base image (`base:<name>`, which every owner sees read-only in
 * its space), from the repository, fetched once per host: the cache is keyed by content hash, so a
 * second task naming the same image (or another path with the same bytes) reuses it.
 */
async function customerImage(
  cache: ImageCache,
  store: VmStore,
  fetch: ImageFetch,
  owner: string,
  image: string,
): Promise<string> {
  const { repository } = fetch;
  const repoPath = imageRepoPath(image);
  const where = image.startsWith(BASE_IMAGE_PREFIX)
    ? "the provider's base images"
    : `${owner}'s repository space`;
  let info;
  try {
    info = await repository.stat(owner, repoPath);
  } catch (err) {
    if (err instanceof RepositoryError && err.status === 400)
      throw ApplicationFailure.nonRetryable(
        `image name '${image}' is invalid: ${err.message}`,
        'InvalidImage',
      );
    throw err;
  }
  if (!info) throw ApplicationFailure.nonRetryable(`image '${image}' is not in ${where}`, 'ImageNotFound');
  const cached = await cache.get(info.sha256);
  if (cached) return cached.path;
  const incoming = path.join(store.imagesDir, '.incoming');
  await fs.mkdir(incoming, { recursive: true });
  // One name per attempt: a retry never writes into a file an earlier attempt may still fill.
  const tmp = path.join(incoming, `${info.sha256}.${process.pid}.${randomBytes(4).toString('hex')}`);
  try {
    await repository.download(owner, repoPath, tmp, { signal: fetch.signal, onProgress: fetch.onProgress });
    return (await cache.ensureFromFile(tmp, info.sha256, `'${image}'`, fetch.signal)).path;
  } catch (err) {
    // Only a bad image is final; a failed download or a full disk may pass on a retry.
    if (err instanceof InvalidImageError)
      throw ApplicationFailure.nonRetryable(describeError(err), 'InvalidImage');
    throw err;
  } finally {
    await fs.rm(tmp, { force: true });
  }
}
