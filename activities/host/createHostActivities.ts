import { promises as fs } from 'node:fs';
import path from 'node:path';
import { ApplicationFailure, Context } from '@temporalio/activity';
import type { HypervisorDriver, VmConfig, VmHandle } from '../../drivers/types';
import { VmMigratedError } from '../../drivers/qemu/qemuDriver';
import { createLogger, describeError } from '../../logging/logger';
import { RepositoryError } from '../../repository/client';
import { UnusableOutputsError } from '../../storage/diskImageStaging';
import type { AwaitResult, StageInResult, StageOutResult, TaskRef, UploadedFile } from '../types';
import type { DriverBinding, HostDeps } from './hostDeps';
import { createConsoleActivities } from './consoleSegments';
import { listOutputFiles } from './outputs';

const log = createLogger('activities.host');

/** Heartbeat at least this often from long steps; the workflow's heartbeat timeout is larger. */
const HEARTBEAT_MS = 2000;
/** Progress reaches the workflow's status query at most this often (each report is a history event). */
const PROGRESS_REPORT_MS = 5000;

/**
 * Activities that touch one host's disk and VMs, run by that host's worker on its own task queue.
 * Each is idempotent: Temporal retries them after failures and worker restarts.
 */
export function createHostActivities(deps: HostDeps) {
  const { store, repository, hostName } = deps;

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

  const stagedMarker = (vmId: string) => path.join(store.paths(vmId).dir, '.staged.json');

  /** The cached base image the driver boots (fetched and validated once per host), if it boots one. */
  async function baseImageFor(ref: TaskRef, driver: string): Promise<string | undefined> {
    const b = binding(driver);
    if (b.resolveImage) return b.resolveImage(ref.spec.owner, ref.spec.image);
    if (ref.spec.image === 'default') return undefined;
    throw ApplicationFailure.nonRetryable(
      `the '${driver}' driver boots no images; image '${ref.spec.image}' cannot be used`,
      'ImageUnsupported',
    );
  }

  async function upload(owner: string, repoPath: string, local: string): Promise<UploadedFile> {
    const info = await repository.upload(owner, repoPath, local);
    return { path: info.path, size: info.size, sha256: info.sha256 };
  }

  return {
    ...createConsoleActivities(deps),

    /** Downloads the inputs from the repository and builds the task's home (a folder or a data disk). */
    async stageIn(ref: TaskRef): Promise<StageInResult> {
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
      // A bad image fails the task before any input is fetched; a good one is cached for createVm.
      if (ref.spec.image !== 'default') {
        Context.current().heartbeat({ step: 'image', image: ref.spec.image });
        await baseImageFor(ref, driver);
      }

      await store.init();
      await fs.mkdir(p.inputsDir, { recursive: true });
      const ctx = Context.current();
      let files = 0;
      for (const input of ref.spec.inputs) {
        ctx.heartbeat({ step: 'download', file: input, done: files, of: ref.spec.inputs.length });
        const dest = path.join(p.inputsDir, input);
        try {
          await fs.mkdir(path.dirname(dest), { recursive: true });
          await repository.download(ref.spec.owner, input, dest);
        } catch (err) {
          if (err instanceof RepositoryError && err.status === 404) {
            await store.remove(ref.vmId);
            throw ApplicationFailure.nonRetryable(
              `input file '${input}' is not in ${ref.spec.owner}'s repository space`,
              'InputNotFound',
            );
          }
          throw err;
        }
        files++;
      }
      ctx.heartbeat({ step: 'build-home', kind: staging.kind });
      const built = await staging.build(p, ref.spec.outputRoomMiB * 1024 * 1024);
      const result: StageInResult = { driver, files, bytes: built.bytes };
      await fs.writeFile(stagedMarker(ref.vmId), JSON.stringify(result));
      log.info({ vmId: ref.vmId, ...result }, 'stage-in done');
      return result;
    },

    /** Prepares the VM (root disk from the cached base image, configuration) without running it. */
    async createVm(ref: TaskRef, driver: string): Promise<VmHandle> {
      const baseImage = await baseImageFor(ref, driver);
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
    },

    async startVm(handle: VmHandle): Promise<VmHandle> {
      return driverOf(handle).start(handle);
    },

    /**
     * Waits for the task to end, heartbeating its progress. After a worker restart the retried
     * activity re-attaches to the VM that kept running; it never starts it again.
     */
    async awaitVm(handle: VmHandle): Promise<AwaitResult> {
      const driver = driverOf(handle);
      const ctx = Context.current();
      const status = await driver.recover(handle);
      if (status.phase === 'missing')
        throw ApplicationFailure.nonRetryable(`VM ${handle.vmId} is gone from host ${hostName}`, 'VmLost');
      let progress: number | undefined;
      let lastBeat = 0;
      let lastReport = { at: 0, progress: -1 };
      const report = (p: number, message?: string) => {
        const now = Date.now();
        const workflowId = ctx.info.workflowExecution?.workflowId;
        if (!deps.reportProgress || !workflowId) return;
        if (p === lastReport.progress || now - lastReport.at < PROGRESS_REPORT_MS) return;
        lastReport = { at: now, progress: p };
        deps.reportProgress(workflowId, p, message).catch((err: unknown) => {
          log.warn({ vmId: handle.vmId, err: describeError(err) }, 'progress report failed');
        });
      };
      try {
        const result = await driver.wait(handle, {
          signal: ctx.cancellationSignal,
          onProgress: (s) => {
            progress = s.progress ?? progress;
            if (s.progress !== undefined) report(s.progress, s.progressMessage);
            const now = Date.now();
            if (now - lastBeat >= HEARTBEAT_MS / 2) {
              lastBeat = now;
              ctx.heartbeat({ phase: s.phase, progress: s.progress, message: s.progressMessage });
            }
          },
        });
        return { ...result, progress };
      } catch (err) {
        if (ctx.cancellationSignal.aborted) throw err;
        // The workflow cancels this wait before it migrates the VM; a late poll still tells what happened.
        if (err instanceof VmMigratedError) throw ApplicationFailure.nonRetryable(err.message, 'VmMigrated');
        throw ApplicationFailure.nonRetryable(describeError(err), 'VmFailed');
      }
    },

    /** Extracts the outputs and the task log from the task's home and uploads them, file by file. */
    async stageOut(ref: TaskRef, handle: VmHandle): Promise<StageOutResult> {
      const { staging } = binding(handle.driver);
      const p = store.paths(ref.vmId);
      const ctx = Context.current();
      ctx.heartbeat({ step: 'extract' });
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
        ctx.heartbeat({ step: 'upload', file: f.rel, done: outputs.length, of: files.length });
        outputs.push(await upload(ref.spec.owner, `${ref.resultsPath}/outputs/${f.rel}`, f.local));
      }
      const logs = await uploadLogs(ref, extracted.taskLog);
      log.info({ vmId: ref.vmId, outputs: outputs.length, bytes: total }, 'stage-out done');
      return { outputs, logs };
    },

    /** On failure or cancellation: whatever logs the task left reach the owner's space. */
    async collectLogs(ref: TaskRef, driver: string | undefined, reason: string): Promise<UploadedFile[]> {
      const p = store.paths(ref.vmId);
      let taskLog: string | undefined;
      const b = driver ? deps.drivers[driver] : undefined;
      if (b) {
        taskLog = await b.staging.extract(p, ref.spec.outputDir).then(
          (x) => x.taskLog,
          (err: unknown) => {
            if (err instanceof UnusableOutputsError) return err.taskLog;
            log.warn({ vmId: ref.vmId, err: describeError(err) }, 'no task log could be extracted');
            return undefined;
          },
        );
      }
      const reasonFile = path.join(p.dir, 'failure.txt');
      await fs.mkdir(p.dir, { recursive: true });
      await fs.writeFile(reasonFile, `${reason}\n`);
      const logs = await uploadLogs(ref, taskLog);
      logs.push(await upload(ref.spec.owner, `${ref.resultsPath}/logs/failure.txt`, reasonFile));
      return logs;
    },

    /** Stops the VM and removes its folder; safe to call any number of times. */
    async destroyVm(ref: TaskRef, handle: VmHandle | undefined): Promise<void> {
      if (handle) await driverOf(handle).destroy(handle);
      await store.remove(ref.vmId);
      log.info({ vmId: ref.vmId }, 'VM destroyed');
    },
  };

  /** The task's own log; the console comes from the host the VM ran on last (collectConsole). */
  async function uploadLogs(ref: TaskRef, taskLog: string | undefined): Promise<UploadedFile[]> {
    return taskLog ? [await upload(ref.spec.owner, `${ref.resultsPath}/logs/task.log`, taskLog)] : [];
  }
}

export type HostActivities = ReturnType<typeof createHostActivities>;
