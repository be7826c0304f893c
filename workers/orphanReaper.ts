import { promises as fs } from 'node:fs';
import path from 'node:path';
import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import { temporal } from '@temporalio/proto';
import type { DriverBinding } from '../activities/host/hostDeps';
import { readTaskRecord, type TaskRecord } from '../activities/host/taskAccess';
import type { VmHandle } from '../drivers/types';
import { createLogger, describeError } from '../logging/logger';
import type { RepositoryClient } from '../repository/client';
import type { VmStore } from '../storage/vmStore';

const log = createLogger('orphan-reaper');

const STARTED = temporal.api.enums.v1.PendingActivityState.PENDING_ACTIVITY_STATE_STARTED;

/** Graceful stop of an orphan before its logs are read. */
const STOP_TIMEOUT_MS = 10_000;
/** Temp files of image downloads older than this are stale on a periodic sweep (all are at start). */
const STALE_TEMP_MS = 6 * 3600_000;

export interface ReaperDeps {
  hostName: string;
  /** This worker's identity; attempts started by another identity of this host are its dead predecessor's. */
  identity: string;
  store: VmStore;
  client: Client;
  drivers: Record<string, DriverBinding>;
  /** A client presenting a task's capability (its logs go to the owner's results with it). */
  repositoryFor: (capability: string) => RepositoryClient;
}

/** What one sweep did, VM by VM (also logged, one structured line per action). */
export interface SweepReport {
  kept: string[];
  reaped: { vmId: string; run: string; logs: 'repository' | 'orphans' | 'none' }[];
  unidentified: string[];
  staleTempFiles: number;
}

/** Where the run that owns a VM folder stands in Temporal. */
type RunState = { open: true; runId: string } | { open: false; why: string };

/**
 * Compares this host's VM store with Temporal, at worker start and then periodically. A VM whose
 * workflow run is open is left (its task re-attaches); one whose run is closed or unknown to Temporal
 * is stopped, its logs kept (in the owner's results if the task's saved capability still works, else
 * under the store's `orphans/` for the operator), and its folder removed. Stale temp files go too.
 */
export class OrphanReaper {
  constructor(private readonly deps: ReaperDeps) {}

  get orphansDir(): string {
    return path.join(this.deps.store.root, 'orphans');
  }

  /**
   * VMs and old temp files; at start, `removeStaleTempFiles(true)` runs first, before any step can, and
   * the sweep also releases the steps the killed predecessor left started (`releaseStaleAttempts`).
   */
  async sweep(opts: { startup: boolean }): Promise<SweepReport> {
    const report: SweepReport = { kept: [], reaped: [], unidentified: [], staleTempFiles: 0 };
    for (const vmId of await this.deps.store.list()) {
      try {
        // A record that does not parse (cut by a crash before records were written durably) names no run
        // either: only the operator can tell, as for a folder from before task records.
        const record = await readTaskRecord(this.deps.store, vmId).catch((err: unknown) => {
          if (err instanceof SyntaxError) return err;
          throw err;
        });
        if (!record || record instanceof SyntaxError) {
          report.unidentified.push(vmId);
          log.warn(
            { action: 'unidentified', vmId, ...(record ? { err: `task.json: ${record.message}` } : {}) },
            `VM folder without a ${record ? 'readable ' : ''}task record: left for the operator`,
          );
          continue;
        }
        const run = `${record.taskId}/${record.runId}`;
        const state = await this.runState(record);
        if (state.open) {
          report.kept.push(vmId);
          log.info({ action: 'keep', vmId, run }, 'VM of an open workflow run: its task re-attaches');
          if (opts.startup) await this.releaseStaleAttempts(record.taskId, state.runId);
          continue;
        }
        const logs = await this.reap(vmId, record, state.why);
        report.reaped.push({ vmId, run, logs });
      } catch (err) {
        log.error({ action: 'error', vmId, err: describeError(err) }, 'could not check or reap a VM');
      }
    }
    report.staleTempFiles = await this.removeStaleTempFiles(false);
    log.info(
      {
        action: 'sweep',
        kept: report.kept.length,
        reaped: report.reaped.length,
        unidentified: report.unidentified.length,
        staleTempFiles: report.staleTempFiles,
      },
      'orphan sweep done',
    );
    return report;
  }

  /** Open when the run, or the run it continued as, still runs; a new run reusing the id does not count. */
  private async runState(record: TaskRecord): Promise<RunState> {
    const { client } = this.deps;
    try {
      const d = await client.workflow.getHandle(record.taskId, record.runId).describe();
      if (d.status.name === 'RUNNING') return { open: true, runId: record.runId };
      if (d.status.name !== 'CONTINUED_AS_NEW') return { open: false, why: d.status.name.toLowerCase() };
      const chain = d.raw.workflowExecutionInfo?.firstRunId;
      const latest = await client.workflow.getHandle(record.taskId).describe();
      const same = chain && latest.raw.workflowExecutionInfo?.firstRunId === chain;
      if (same && latest.status.name === 'RUNNING') return { open: true, runId: latest.runId };
      return { open: false, why: same ? latest.status.name.toLowerCase() : 'continued, then closed' };
    } catch (err) {
      if (err instanceof WorkflowNotFoundError) return { open: false, why: 'unknown to Temporal' };
      throw err;
    }
  }

  /**
   * Steps of an open run that a dead predecessor of this worker had started would wait for their
   * heartbeat or start-to-close timeout before Temporal retries them (up to minutes). Failing those
   * attempts now (retryable) has them retried at once, here: a restart costs seconds, not timeouts.
   */
  async releaseStaleAttempts(workflowId: string, runId?: string): Promise<void> {
    const d = await this.deps.client.workflow.getHandle(workflowId, runId).describe();
    const ours = `vsp-host-${this.deps.hostName}@`;
    for (const a of d.raw.pendingActivities ?? []) {
      const by = a.lastWorkerIdentity ?? '';
      if (a.state !== STARTED || !a.activityId || !by.startsWith(ours) || by === this.deps.identity) continue;
      await this.deps.client.activity
        .fail(
          { workflowId, runId, activityId: a.activityId },
          new Error(
            `host ${this.deps.hostName}'s worker ${by} died during this step; ${this.deps.identity} retries it`,
          ),
        )
        .then(
          () =>
            log.info(
              {
                action: 'release-attempt',
                workflowId,
                activity: a.activityType?.name,
                attempt: a.attempt,
                by,
              },
              "a dead worker's attempt released for retry",
            ),
          // It may have ended meanwhile (timed out, or the run moved on): nothing to release then.
          (err: unknown) =>
            log.debug(
              { workflowId, activityId: a.activityId, err: describeError(err) },
              'attempt not released',
            ),
        );
    }
  }

  private async reap(
    vmId: string,
    record: TaskRecord,
    why: string,
  ): Promise<SweepReport['reaped'][0]['logs']> {
    const { store, hostName } = this.deps;
    const run = `${record.taskId}/${record.runId}`;
    const saved = await store.readState<{ handle?: VmHandle }>(vmId).catch(() => undefined);
    const driverName = saved?.handle?.driver ?? record.driver;
    const binding = driverName ? this.deps.drivers[driverName] : undefined;
    const handle: VmHandle = saved?.handle ?? {
      driver: driverName ?? 'unknown',
      vmId,
      host: hostName,
      storageHost: hostName,
      state: {},
    };
    if (driverName && !binding) {
      log.error(
        { action: 'unreapable', vmId, run, driver: driverName },
        'orphan VM of a driver this host does not run: left for the operator',
      );
      throw new Error(`no '${driverName}' driver on host ${hostName}`);
    }
    if (binding) {
      await binding.driver.stop(handle, STOP_TIMEOUT_MS);
      log.info({ action: 'stop', vmId, run, workflow: why }, 'orphan VM stopped');
    }
    const files = await this.logFiles(vmId, record, binding);
    const kept = await this.keepLogs(vmId, record, files, why);
    if (binding) await binding.driver.destroy(handle);
    await store.remove(vmId);
    log.info({ action: 'remove', vmId, run, logs: kept }, 'orphan VM folder removed');
    return kept;
  }

  /** The task log (from its home) and the console, with their names under `logs/`. */
  private async logFiles(
    vmId: string,
    record: TaskRecord,
    binding: DriverBinding | undefined,
  ): Promise<{ name: string; local: string }[]> {
    const p = this.deps.store.paths(vmId);
    const files: { name: string; local: string }[] = [];
    if (binding) {
      const taskLog = await binding.staging.extract(p, record.outputDir).then(
        (x) => x.taskLog,
        (err: unknown) => {
          const kept = (err as { taskLog?: string }).taskLog;
          if (!kept) log.warn({ vmId, err: describeError(err) }, 'no task log could be extracted');
          return kept;
        },
      );
      if (taskLog) files.push({ name: 'task.log', local: taskLog });
    }
    if (await fs.stat(p.consoleLog).catch(() => undefined))
      files.push({ name: 'console.log', local: p.consoleLog });
    return files;
  }

  /** Uploads the logs with the task's capability; when that fails, moves them under orphans/. */
  private async keepLogs(
    vmId: string,
    record: TaskRecord,
    files: { name: string; local: string }[],
    why: string,
  ): Promise<SweepReport['reaped'][0]['logs']> {
    if (files.length === 0) return 'none';
    const run = `${record.taskId}/${record.runId}`;
    const note = `host ${this.deps.hostName} found this VM after its workflow run had ended (${why}); its logs were kept by the orphan reaper at ${new Date().toISOString()}\n`;
    if (record.capability) {
      const repository = this.deps.repositoryFor(record.capability);
      try {
        const noteFile = path.join(this.deps.store.paths(vmId).dir, 'reaped.txt');
        await fs.writeFile(noteFile, note);
        for (const f of [...files, { name: 'reaped.txt', local: noteFile }])
          await repository.upload(record.owner, `${record.resultsPath}/logs/${f.name}`, f.local);
        log.info(
          { action: 'keep-logs', vmId, run, to: `${record.resultsPath}/logs` },
          'orphan logs uploaded',
        );
        // The run is over: its capability must not outlive it (the workflow's own revoke never ran).
        await repository
          .revokeSelf()
          .catch((err: unknown) =>
            log.warn(
              { action: 'revoke-failed', vmId, run, err: describeError(err) },
              'capability not revoked',
            ),
          );
        return 'repository';
      } catch (err) {
        log.warn(
          { action: 'keep-logs-failed', vmId, run, err: describeError(err) },
          "the task's capability no longer works: its logs stay on the host",
        );
      }
    }
    const dest = path.join(this.orphansDir, `${vmId}-${Date.now()}`);
    await fs.mkdir(dest, { recursive: true });
    for (const f of files) await fs.copyFile(f.local, path.join(dest, f.name));
    const { capability: _secret, ...withoutSecret } = record;
    await fs.writeFile(path.join(dest, 'task.json'), JSON.stringify(withoutSecret, null, 2));
    await fs.writeFile(path.join(dest, 'reaped.txt'), note);
    log.info({ action: 'keep-logs', vmId, run, to: dest }, 'orphan logs kept for the operator');
    return 'orphans';
  }

  /**
   * Image downloads and cache copies cut short. At start (before the worker polls, so no step of its
   * own can be writing one) every one; later, those older than a few hours. A task's partial input
   * downloads are its stage-in's to remove (it does, on a retry), or go with its folder.
   */
  async removeStaleTempFiles(startup: boolean): Promise<number> {
    const images = this.deps.store.imagesDir;
    const incoming = path.join(images, '.incoming');
    const candidates = [
      ...(await fs.readdir(incoming).catch(() => [] as string[])).map((n) => path.join(incoming, n)),
      ...(await fs.readdir(images).catch(() => [] as string[]))
        .filter((n) => n.startsWith('.incoming.'))
        .map((n) => path.join(images, n)),
    ];
    let removed = 0;
    for (const file of candidates) {
      const st = await fs.stat(file).catch(() => undefined);
      if (!st?.isFile() || (!startup && Date.now() - st.mtimeMs < STALE_TEMP_MS)) continue;
      await fs.rm(file, { force: true });
      log.info({ action: 'remove-temp', file }, 'stale temp file removed');
      removed++;
    }
    return removed;
  }
}
