import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ApplicationFailure, Context } from '@temporalio/activity';
import type { CpuShare, ExitResult, HypervisorDriver, VmConfig, VmHandle } from '../../drivers/types';
import { VmMigratedError } from '../../drivers/qemu/qemuDriver';
import { createLogger, describeError } from '../../logging/logger';
import type { RepositoryClient } from '../../repository/client';
import { commandFailure } from '../../workflows/definitions';
import { UnusableOutputsError } from '../../storage/diskImageStaging';
import { sha256File } from '../../storage/imageCache';
import { downloadInputs, InputNotFound, inputSizes } from '../../storage/inputDownloads';
import type {
  AwaitResult,
  LaunchResult,
  StageInResult,
  StageOutResult,
  TaskRef,
  UploadedFile,
} from '../types';
import type { DriverBinding, HostDeps, ImageFetch } from './hostDeps';
import { createConsoleActivities, type ConsoleSegment } from './consoleSegments';
import { CpuSteering, type CpuPlan } from './cpuSteering';
import { classified } from './failures';
import { heartbeating, type Heartbeat } from './heartbeat';
import { shipLiveLog } from './liveLog';
import { progressSteps } from './progressSteps';
import { listOutputFiles } from './outputs';
import { saveTaskRecord, taskRecordOf, taskRepository } from './taskAccess';

const log = createLogger('activities.host');

/** A driver error while the VM still runs (a QMP timeout, an `xl list` hiccup) is retried this long. */
const TRANSIENT_DRIVER_ERROR_MS = 60_000;
const TRANSIENT_RETRY_MS = 1000;

/** What stage-in heartbeats, so that a retried attempt skips the inputs already verified. */
interface StageInProgress {
  /** Input path -> SHA-256 of the copy already in the inputs folder. */
  verified?: Record<string, string>;
}

/**
 * Activities that touch one host's disk and VMs, run by that host's worker on its own task queue.
 * Each is idempotent: Temporal retries them after failures and worker restarts. Long ones heartbeat
 * from a timer and from byte progress, and stop their downloads and tools when cancelled. A task's
 * transfers present its own capability; errors that cannot heal fail at once (failures.ts).
 */
export function createHostActivities(deps: HostDeps) {
  const { store, hostName } = deps;

  function binding(driver: string): DriverBinding {
    const b = deps.drivers[driver];
    if (!b)
      throw ApplicationFailure.nonRetryable(
        `host ${hostName} has no '${driver}' driver (it has: ${Object.keys(deps.drivers).join(', ')})`,
        'DriverUnavailable',
      );
    return b;
  }

  function driverOf(handle: VmHandle): HypervisorDriver {
    return binding(handle.driver).driver;
  }

  /** The repository as this task may use it (its capability, checked against this activity's workflow). */
  function repositoryOf(ref: TaskRef): RepositoryClient {
    const workflowId = Context.current().info.workflowExecution?.workflowId ?? ref.taskId;
    return taskRepository(ref, workflowId, deps.repositoryFor);
  }

  /** Shares set by resize while a VM runs here (awaitVm keeps them in its heartbeats across restarts). */
  const resized = new Map<string, CpuShare>();

  const stagedMarker = (vmId: string) => path.join(store.paths(vmId).dir, '.staged.json');

  /** The cached base image the driver boots (fetched and validated once per host), if it boots one. */
  async function baseImageFor(ref: TaskRef, driver: string, fetch: ImageFetch): Promise<string | undefined> {
    const b = binding(driver);
    if (b.resolveImage) return b.resolveImage(ref.spec.owner, ref.spec.image, fetch);
    if (ref.spec.image === 'default') return undefined;
    throw ApplicationFailure.nonRetryable(
      `the '${driver}' driver boots no images; image '${ref.spec.image}' cannot be used`,
      'ImageUnsupported',
    );
  }

  function imageFetch(ref: TaskRef, hb: Heartbeat): ImageFetch {
    return { repository: repositoryOf(ref), signal: hb.signal, onProgress: hb.onBytes };
  }

  /**
   * Stores one file with its SHA-256 (the repository checks it), unless the same bytes are already
   * there: a retried stage-out does not send again what an earlier attempt stored.
   */
  async function storeFile(
    repository: RepositoryClient,
    owner: string,
    repoPath: string,
    local: string,
    hb: Heartbeat,
  ): Promise<UploadedFile> {
    const sha256 = await sha256File(local);
    const there = await repository.stat(owner, repoPath);
    if (there?.sha256 === sha256) return { path: there.path, size: there.size, sha256 };
    hb.update({ file: repoPath, bytes: 0 });
    const info = await repository.upload(owner, repoPath, local, {
      sha256,
      signal: hb.signal,
      onProgress: hb.onBytes,
    });
    return { path: info.path, size: info.size, sha256: info.sha256 };
  }

  /** The task's own log; the console comes from the host the VM ran on last (collectConsole). */
  async function uploadLogs(
    repository: RepositoryClient,
    ref: TaskRef,
    taskLog: string | undefined,
    hb: Heartbeat,
  ): Promise<UploadedFile[]> {
    return taskLog
      ? [await storeFile(repository, ref.spec.owner, `${ref.resultsPath}/logs/task.log`, taskLog, hb)]
      : [];
  }

  /** Why the task failed, as `logs/failure.txt` in its results. */
  async function storeFailure(
    repository: RepositoryClient,
    ref: TaskRef,
    reason: string,
    hb: Heartbeat,
  ): Promise<UploadedFile> {
    const dir = store.paths(ref.vmId).dir;
    await fs.mkdir(dir, { recursive: true });
    const reasonFile = path.join(dir, `failure.${Context.current().info.attempt}.txt`);
    await fs.writeFile(reasonFile, `${reason}\n`);
    try {
      return await storeFile(
        repository,
        ref.spec.owner,
        `${ref.resultsPath}/logs/failure.txt`,
        reasonFile,
        hb,
      );
    } finally {
      await fs.rm(reasonFile, { force: true });
    }
  }

  async function create(ref: TaskRef, driver: string, hb: Heartbeat): Promise<VmHandle> {
    const baseImage = await baseImageFor(ref, driver, imageFetch(ref, hb));
    const config: VmConfig = {
      vmId: ref.vmId,
      owner: ref.spec.owner,
      command: ref.spec.command,
      vcpus: ref.spec.vcpus,
      memoryMiB: ref.spec.memoryMiB,
      baseImage,
      ports: ref.spec.ports,
      timeLimitSec: ref.spec.timeLimitSec,
    };
    return binding(driver).driver.create(config);
  }

  /**
   * The task's last step: its capability stops working (DELETE /v1/capabilities/self), so neither a
   * replay nor a reused workflow id can write into this run's results. Idempotent: a capability that
   * no longer works counts as released.
   */
  async function releaseCapability(ref: TaskRef): Promise<void> {
    if (ref.capability === undefined) return;
    const repository = repositoryOf(ref);
    await classified(hostName, async () => {
      const revoked = await repository.revokeSelf();
      log.info({ taskId: ref.taskId, revokedNow: revoked }, 'task capability released');
    });
  }

  /** Runs a long host step: timer heartbeats with `details`, errors classified. */
  const longStep = <T>(details: Record<string, unknown>, work: (hb: Heartbeat) => Promise<T>) =>
    classified(hostName, () => heartbeating(details, work));

  const consoleActivities = createConsoleActivities(deps, repositoryOf);

  /**
   * The console, for a stage-out on the host the VM ran on alone: what collectConsole would store
   * next. Any failure leaves it to collectConsole (undefined), with its own retries and repository wait.
   */
  async function consoleHere(ref: TaskRef, segments: ConsoleSegment[]): Promise<UploadedFile[] | undefined> {
    if (segments.length !== 1 || segments[0].host !== hostName) return undefined;
    return consoleActivities.collectConsole(ref, segments).catch((err: unknown) => {
      log.warn({ vmId: ref.vmId, err: describeError(err) }, 'console not kept with the outputs');
      return undefined;
    });
  }

  return {
    ...consoleActivities,

    /** Downloads the inputs from the repository and builds the task's home (a folder or a data disk). */
    async stageIn(ref: TaskRef): Promise<StageInResult> {
      return longStep({ step: 'stage-in' }, async (hb) => {
        const driver = ref.spec.driver ?? deps.defaultDriver;
        if (!driver)
          throw ApplicationFailure.nonRetryable(
            `host ${hostName} has no VM driver to default to: a task for it must name its driver ('process' is never a default)`,
            'DriverUnavailable',
          );
        const { staging } = binding(driver);
        const p = store.paths(ref.vmId);
        const done = await fs.readFile(stagedMarker(ref.vmId), 'utf8').catch(() => undefined);
        if (done) return JSON.parse(done) as StageInResult;
        const repository = repositoryOf(ref);
        const runId = Context.current().info.workflowExecution?.runId ?? '';
        await store.init();
        // First, so that the orphan reaper can tell whose folder this is from its first byte on.
        await saveTaskRecord(store, ref.vmId, taskRecordOf(ref, runId, driver));
        // A bad image fails the task before any input is fetched; a good one is cached for createVm.
        if (ref.spec.image !== 'default') {
          hb.update({ step: 'image', image: ref.spec.image });
          await baseImageFor(ref, driver, imageFetch(ref, hb));
        }

        // Sizes first: a data disk is made to measure and the inputs stream onto it (one landing).
        hb.update({ step: 'plan', of: ref.spec.inputs.length });
        const outputRoomBytes = ref.spec.outputRoomMiB * 1024 * 1024;
        let inputs: { downloaded: number; kept: number };
        try {
          const files = await inputSizes(repository, ref.spec.owner, ref.spec.inputs);
          await staging.prepare(p, { files, outputRoomBytes }, { signal: hb.signal });
          await fs.mkdir(p.inputsDir, { recursive: true });
          const partial = await removePartialDownloads(p.inputsDir);
          if (partial > 0)
            log.info({ vmId: ref.vmId, files: partial }, 'partial downloads of an earlier attempt removed');
          const verified = { ...hb.previous<StageInProgress>()?.verified };
          hb.update({ step: 'download', done: 0, of: files.length, bytes: 0 });
          inputs = await downloadInputs(repository, ref.spec.owner, p.inputsDir, {
            files,
            verified,
            sync: !staging.syncsInputs,
            signal: hb.signal,
            onProgress: (progress) => hb.update({ ...progress }),
            onVerified: () => hb.update({ verified }, true),
          });
        } catch (err) {
          if (err instanceof InputNotFound) {
            await store.remove(ref.vmId);
            throw ApplicationFailure.nonRetryable(err.message, 'InputNotFound');
          }
          throw err;
        }
        hb.update({ step: 'build-home', kind: staging.kind });
        const built = await staging.build(p, outputRoomBytes, { signal: hb.signal });
        const result: StageInResult = { driver, files: inputs.downloaded + inputs.kept, bytes: built.bytes };
        await fs.writeFile(stagedMarker(ref.vmId), JSON.stringify(result));
        log.info({ vmId: ref.vmId, ...result, skipped: inputs.kept }, 'stage-in done');
        return result;
      });
    },

    /** Prepares the VM (root disk from the cached base image, configuration) without running it. */
    async createVm(ref: TaskRef, driver: string): Promise<VmHandle> {
      return longStep({ step: 'create' }, (hb) => create(ref, driver, hb));
    },

    async startVm(handle: VmHandle): Promise<VmHandle> {
      return longStep({ step: 'start' }, () => driverOf(handle).start(handle));
    },

    /**
     * createVm then startVm in one step on the same host, one Temporal round trip fewer. Both halves
     * are idempotent (the driver finds the VM it created, and a start is claimed once in the VM folder),
     * so a retried attempt goes on where the last one stopped. `createdAtMs` (this host's clock) is
     * when the VM was ready to start: the workflow's 'starting' phase begins there.
     */
    async launchVm(ref: TaskRef, driver: string): Promise<LaunchResult> {
      return longStep({ step: 'create' }, async (hb) => {
        const created = await create(ref, driver, hb);
        const createdAtMs = Date.now();
        hb.update({ step: 'start' }, true);
        return { handle: await binding(driver).driver.start(created), createdAtMs };
      });
    },

    /**
     * Waits for the task to end, heartbeating its progress as `{progress, message, phase}` (the status
     * query reads it from there). After a worker restart the retried activity re-attaches to the VM
     * that kept running; it never starts it again. A driver error while the VM still runs is retried
     * for a while; only a VM that is gone, or errors that last, fail the task.
     */
    async awaitVm(handle: VmHandle, cpu: CpuPlan = {}): Promise<AwaitResult> {
      const driver = driverOf(handle);
      const ctx = Context.current();
      const previous = ctx.info.heartbeatDetails as Record<string, unknown> | undefined;
      // A resize since the wait began outlives a worker restart in the heartbeat details.
      const carried = previous?.cpuShare as CpuShare | undefined;
      if (carried && !resized.has(handle.vmId)) resized.set(handle.vmId, carried);
      const steering = new CpuSteering(
        driver,
        handle,
        cpu,
        () => resized.get(handle.vmId),
        ctx.cancellationSignal,
      );
      // What the task prints reaches its live log in the repository while it runs (vsp logs -f).
      const workflowId = ctx.info.workflowExecution?.workflowId ?? '';
      const stopShipping = await shipLiveLog(deps, handle.vmId, workflowId, driver.capabilities.isolation);
      return heartbeating({ phase: 'running', ...previous }, async (hb) => {
        let progress = typeof previous?.progress === 'number' ? previous.progress : undefined;
        let message = typeof previous?.message === 'string' ? previous.message : undefined;
        const step = progressSteps(workflowId, deps.reportProgress, progress);
        let failingSince: number | undefined;
        for (;;) {
          try {
            const status = await driver.recover(handle);
            if (status.phase === 'missing') {
              // The driver's reason (a guest that crashed, a domain that is gone) is the task's error.
              const why = status.details.reason;
              throw ApplicationFailure.nonRetryable(
                `VM ${handle.vmId} is gone from host ${hostName}${why ? `: ${String(why)}` : ''}`,
                'VmLost',
              );
            }
            const result = await driver.wait(handle, {
              signal: ctx.cancellationSignal,
              onProgress: (s) => {
                failingSince = undefined;
                if (s.progress !== undefined) [progress, message] = [s.progress, s.progressMessage];
                step(progress, message);
                steering.observe(progress);
                hb.update({
                  progress,
                  message,
                  phase: s.phase,
                  cpuShare: steering.current(),
                  ...(steering.behind ? { behindDeadline: true } : {}),
                });
              },
            });
            // The report read after the end is the last one: printed just before, it reached no poll.
            return {
              ...result,
              progress: result.progress ?? progress,
              progressMessage: result.progress !== undefined ? result.progressMessage : message,
            };
          } catch (err) {
            if (ctx.cancellationSignal.aborted || err instanceof ApplicationFailure) throw err;
            // The workflow cancels this wait before it migrates the VM; a late poll still tells what happened.
            if (err instanceof VmMigratedError)
              throw ApplicationFailure.nonRetryable(err.message, 'VmMigrated');
            failingSince ??= Date.now();
            const now = await driver.inspect(handle).catch(() => undefined);
            const ended = now?.phase === 'missing' || now?.phase === 'created';
            if (ended || Date.now() - failingSince > TRANSIENT_DRIVER_ERROR_MS)
              throw ApplicationFailure.nonRetryable(describeError(err), 'VmFailed');
            log.warn(
              { vmId: handle.vmId, phase: now?.phase, err: describeError(err) },
              'driver error while the VM runs; retrying',
            );
            await sleep(TRANSIENT_RETRY_MS, undefined, { signal: ctx.cancellationSignal });
          }
        }
      }).finally(stopShipping);
    },

    /** Sets the running VM's CPU share (the resize update); awaitVm keeps it while it waits. */
    async setCpuShare(handle: VmHandle, share: CpuShare): Promise<void> {
      const driver = driverOf(handle);
      if (!driver.setCpuShare)
        throw ApplicationFailure.nonRetryable(
          `the ${handle.driver} driver on host ${hostName} cannot change a task's CPU share`,
          'Unsupported',
        );
      const set = driver.setCpuShare.bind(driver);
      // A VM that ended or left meanwhile will not run here again: no retry helps.
      const phase = (await driver.inspect(handle).catch(() => undefined))?.phase;
      if (phase !== undefined && phase !== 'running')
        throw ApplicationFailure.nonRetryable(
          `VM ${handle.vmId} is ${phase} on host ${hostName}: its CPU share cannot change`,
          'VmNotRunning',
        );
      await classified(hostName, () => set(handle, share));
      resized.set(handle.vmId, share);
    },

    /**
     * Extracts the outputs and the task log from the task's home and uploads them, file by file; with
     * an `exit` that failed (status not 0, time limit), its reason as `logs/failure.txt` too. With the
     * console's `segments` (a VM that never left this host), the console as well (`console`).
     */
    async stageOut(
      ref: TaskRef,
      handle: VmHandle,
      exit?: ExitResult,
      segments?: ConsoleSegment[],
    ): Promise<StageOutResult> {
      return longStep({ step: 'extract' }, async (hb) => {
        const repository = repositoryOf(ref);
        const { staging } = binding(handle.driver);
        const p = store.paths(ref.vmId);
        const extracted = await staging.extract(p, ref.spec.outputDir).catch((err: unknown) => {
          if (err instanceof UnusableOutputsError)
            throw ApplicationFailure.nonRetryable(err.message, err.reason);
          throw err;
        });
        let files;
        try {
          files = await listOutputFiles(extracted.outputsDir);
        } catch (err) {
          throw ApplicationFailure.nonRetryable(describeError(err), 'BadOutputs');
        }
        const room = ref.spec.outputRoomMiB * 1024 * 1024;
        const total = files.reduce((n, f) => n + f.size, 0);
        if (total > room)
          throw ApplicationFailure.nonRetryable(
            `the task's outputs (${total} bytes) exceed its declared output room of ${ref.spec.outputRoomMiB} MiB`,
            'OutputsTooLarge',
          );
        const outputs: UploadedFile[] = [];
        for (const f of files) {
          hb.update({ step: 'upload', done: outputs.length, of: files.length });
          const repoPath = `${ref.resultsPath}/outputs/${f.rel}`;
          outputs.push(await storeFile(repository, ref.spec.owner, repoPath, f.local, hb));
        }
        const logs = await uploadLogs(repository, ref, extracted.taskLog, hb);
        const failed = exit && commandFailure(exit, ref.spec.timeLimitSec);
        if (failed) logs.push(await storeFailure(repository, ref, failed, hb));
        const consoleKept = segments && (await consoleHere(ref, segments));
        log.info({ vmId: ref.vmId, outputs: outputs.length, bytes: total }, 'stage-out done');
        return { outputs, logs, ...(consoleKept ? { console: consoleKept } : {}) };
      });
    },

    /** On failure or cancellation: whatever logs the task left reach the owner's space. */
    async collectLogs(ref: TaskRef, driver: string | undefined, reason: string): Promise<UploadedFile[]> {
      return longStep({ step: 'collect-logs' }, async (hb) => {
        const repository = repositoryOf(ref);
        const p = store.paths(ref.vmId);
        const taskLog = driver ? await extractTaskLog(deps.drivers[driver], p, ref) : undefined;
        const logs = await uploadLogs(repository, ref, taskLog, hb);
        logs.push(await storeFailure(repository, ref, reason, hb));
        return logs;
      });
    },

    /**
     * Stops the VM and removes its folder; safe to call any number of times. With `releaseCapability`
     * (the task's last host step), then ends the task's capability too, one round trip fewer. The result
     * says whether it did: a failure there is not the destroy's (it must not hold the VM's cleanup in
     * retries), and the workflow then asks releaseCapability, with that step's own bounds.
     */
    async destroyVm(
      ref: TaskRef,
      handle: VmHandle | undefined,
      opts: { releaseCapability?: boolean } = {},
    ): Promise<{ capabilityReleased: boolean }> {
      resized.delete(ref.vmId);
      await longStep({ step: 'destroy' }, async () => {
        if (handle) await driverOf(handle).destroy(handle);
        await store.remove(ref.vmId);
        log.info({ vmId: ref.vmId }, 'VM destroyed');
      });
      if (!opts.releaseCapability) return { capabilityReleased: false };
      return releaseCapability(ref).then(
        () => ({ capabilityReleased: true }),
        (err: unknown) => {
          log.warn({ taskId: ref.taskId, err: describeError(err) }, 'capability not released with the VM');
          return { capabilityReleased: false };
        },
      );
    },

    releaseCapability,
  };
}

/** The task log a task left, or undefined (a failure to read it is logged: the failure matters more). */
async function extractTaskLog(
  b: DriverBinding | undefined,
  p: ReturnType<HostDeps['store']['paths']>,
  ref: TaskRef,
): Promise<string | undefined> {
  if (!b) return undefined;
  return b.staging.extract(p, ref.spec.outputDir).then(
    (x) => x.taskLog,
    (err: unknown) => {
      if (err instanceof UnusableOutputsError) return err.taskLog;
      log.warn({ vmId: ref.vmId, err: describeError(err) }, 'no task log could be extracted');
      return undefined;
    },
  );
}

/** Downloads cut short by an earlier attempt (`.<name>.<nonce>.part`, see RepositoryClient.download). */
export async function removePartialDownloads(dir: string): Promise<number> {
  let removed = 0;
  for (const e of await fs.readdir(dir, { withFileTypes: true, recursive: true }).catch(() => [])) {
    if (e.isFile() && e.name.startsWith('.') && e.name.endsWith('.part')) {
      await fs.rm(path.join(e.parentPath, e.name), { force: true });
      removed++;
    }
  }
  return removed;
}

export type HostActivities = ReturnType<typeof createHostActivities>;
