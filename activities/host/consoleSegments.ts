import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { departedConsoleOf } from '../../drivers/qemu/consoleLog';
import { readTail } from '../../lib/fileRange';
import { createLogger } from '../../logging/logger';
import { RepositoryError, type RepositoryClient } from '../../repository/client';
import type { TaskRef, UploadedFile } from '../types';
import { classified } from './failures';
import { heartbeating, type Heartbeat } from './heartbeat';
import type { HostDeps } from './hostDeps';

const log = createLogger('activities.console');

/** The part of a VM's console written on one host, between its arrival and its departure. */
export interface ConsoleSegment {
  /** 1 for the host the VM started on, then one more per completed migration. */
  n: number;
  host: string;
  /** ISO times; `until` is unset for the segment still being written. */
  since: string;
  until?: string;
}

/** Each segment is kept whole up to this size (its tail); a console is a log, not an output. */
const SEGMENT_BYTES = 256 * 1024;

/** A segment's own file in the task's logs, written by its host as the VM leaves it (or at the end). */
export function segmentRepoPath(resultsPath: string, s: ConsoleSegment): string {
  return `${resultsPath}/logs/console-${s.n}-${s.host}.log`;
}

export function segmentHeader(s: ConsoleSegment): string {
  return `=== host ${s.host}, ${s.since} .. ${s.until ?? 'end'} ===`;
}

/**
 * The console of a VM that moved between hosts reaches the task's logs piece by piece: each host that
 * the VM leaves uploads its segment then, since that host's VM folder goes (or is reused on a return)
 * and the host may be gone by the end; the host it ends on uploads the last one and `logs/console.log`,
 * every segment in order under a header line (the one file a reader opens). Both are idempotent.
 */
export function createConsoleActivities(deps: HostDeps, repositoryOf: (ref: TaskRef) => RepositoryClient) {
  const { store, hostName } = deps;
  /** Scratch files are per attempt: a retry never shares one with an attempt that may still run. */
  const scratchOf = (file: string, what: string) => `${file}.${randomBytes(4).toString('hex')}.${what}`;

  async function uploadTail(
    repository: RepositoryClient,
    owner: string,
    repoPath: string,
    file: string,
    hb: Heartbeat,
  ): Promise<UploadedFile> {
    const tail = await readTail(file, SEGMENT_BYTES);
    const local = scratchOf(file, 'upload');
    await fs.writeFile(local, tail);
    try {
      const info = await repository.upload(owner, repoPath, local, {
        signal: hb.signal,
        onProgress: hb.onBytes,
      });
      return { path: info.path, size: info.size, sha256: info.sha256 };
    } finally {
      await fs.rm(local, { force: true });
    }
  }

  /** The text of an earlier segment from the repository; a note in its place when it was never kept. */
  async function earlierSegment(
    repository: RepositoryClient,
    ref: TaskRef,
    s: ConsoleSegment,
    scratch: string,
    hb: Heartbeat,
  ): Promise<string> {
    try {
      await repository.download(ref.spec.owner, segmentRepoPath(ref.resultsPath, s), scratch, {
        signal: hb.signal,
      });
      return await fs.readFile(scratch, 'utf8');
    } catch (err) {
      if (!(err instanceof RepositoryError && err.status === 404)) throw err;
      return `(host ${hostName} found no console of host ${s.host} in the task's logs)\n`;
    } finally {
      await fs.rm(scratch, { force: true });
    }
  }

  return {
    /**
     * On the host the VM left: uploads the console it wrote here (set aside by the driver as the VM
     * left), then drops it. Nothing set aside (already kept, or a driver without console): undefined.
     */
    async keepConsoleSegment(ref: TaskRef, segment: ConsoleSegment): Promise<UploadedFile | undefined> {
      return classified(hostName, () =>
        heartbeating({ step: 'keep-console' }, async (hb) => {
          const departed = departedConsoleOf(store.root, ref.vmId);
          if (!(await fs.stat(departed).catch(() => undefined))) return undefined;
          const repoPath = segmentRepoPath(ref.resultsPath, segment);
          const kept = await uploadTail(repositoryOf(ref), ref.spec.owner, repoPath, departed, hb);
          await fs.rm(departed, { force: true });
          log.info({ vmId: ref.vmId, segment: segment.n, bytes: kept.size }, 'console segment kept');
          return kept;
        }),
      );
    },

    /**
     * On the host where the VM ran last, before its folder goes: the console as `logs/console.log`;
     * after migrations, all segments in order (the earlier ones from the repository) and the last one
     * as its own file too.
     */
    async collectConsole(ref: TaskRef, segments: ConsoleSegment[]): Promise<UploadedFile[]> {
      const last = segments.at(-1);
      if (!last || last.host !== hostName)
        throw new Error(`the console's last segment is not on host ${hostName}: ${JSON.stringify(last)}`);
      return classified(hostName, () =>
        heartbeating({ step: 'collect-console' }, async (hb) => {
          const repository = repositoryOf(ref);
          const p = store.paths(ref.vmId);
          const owner = ref.spec.owner;
          const wholePath = `${ref.resultsPath}/logs/console.log`;
          const own = await readTail(p.consoleLog, SEGMENT_BYTES);
          if (segments.length === 1)
            return own ? [await uploadTail(repository, owner, wholePath, p.consoleLog, hb)] : [];
          await fs.mkdir(p.dir, { recursive: true });
          const whole = scratchOf(path.join(p.dir, 'console-whole'), 'log');
          try {
            const parts: string[] = [];
            for (const s of segments.slice(0, -1))
              parts.push(
                segmentHeader(s),
                await earlierSegment(repository, ref, s, scratchOf(whole, 'segment'), hb),
              );
            parts.push(segmentHeader(last), own);
            await fs.writeFile(whole, parts.map((t) => (t.endsWith('\n') ? t : `${t}\n`)).join(''));
            const lastPath = segmentRepoPath(ref.resultsPath, last);
            const lastKept = await uploadTail(repository, owner, lastPath, p.consoleLog, hb);
            // Not cut to a tail: each segment in it already is.
            const info = await repository.upload(owner, wholePath, whole, {
              signal: hb.signal,
              onProgress: hb.onBytes,
            });
            log.info({ vmId: ref.vmId, segments: segments.length, bytes: info.size }, 'console collected');
            return [lastKept, { path: info.path, size: info.size, sha256: info.sha256 }];
          } finally {
            await fs.rm(whole, { force: true });
          }
        }),
      );
    },
  };
}
