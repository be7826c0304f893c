import { promises as fs } from 'node:fs';
import path from 'node:path';
import { RepositoryError, type FileInfo, type RepositoryClient } from '../repository/client';
import { sha256File } from './imageCache';

/** An input the owner's space does not hold. */
export class InputNotFound extends Error {
  constructor(
    readonly input: string,
    owner: string,
    options?: { cause?: unknown },
  ) {
    super(`input file '${input}' is not in ${owner}'s repository space`, options);
    this.name = 'InputNotFound';
  }
}

/** Each input's size, from the repository (several at once); InputNotFound names the first one missing. */
export async function inputSizes(
  repository: RepositoryClient,
  owner: string,
  inputs: string[],
): Promise<{ path: string; size: number }[]> {
  const infos = new Array<FileInfo | undefined>(inputs.length);
  await atOnce(inputs.length, INPUT_DOWNLOADS_AT_ONCE, async (i) => {
    infos[i] = await repository.stat(owner, inputs[i]);
  });
  return inputs.map((input, i) => {
    const info = infos[i];
    if (!info) throw new InputNotFound(input, owner);
    return { path: input, size: info.size };
  });
}

/**
 * Runs `fn` for 0..count-1, `n` at a time, in order of start. The first failure stops starting more
 * (`onFailure` can stop those under way) and is thrown once every call under way has ended.
 */
async function atOnce(
  count: number,
  n: number,
  fn: (i: number) => Promise<void>,
  onFailure?: (err: unknown) => void,
): Promise<void> {
  let next = 0;
  let failure: { err: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (!failure && next < count) {
      try {
        await fn(next++);
      } catch (err) {
        // The first failure is the one to report; the others are the stop it caused.
        if (!failure) {
          failure = { err };
          onFailure?.(err);
        }
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(n, count) }, worker));
  if (failure) throw failure.err;
}

/**
 * Requests at once (stats, downloads): enough to hide each request's round trip and each file's open,
 * rename and metadata writes behind the others' (1000 small inputs: sizes in batches of 16 took 1.2 s,
 * downloads one by one most of the rest), few enough that big ones still stream.
 */
export const INPUT_DOWNLOADS_AT_ONCE = 8;

export interface InputProgress {
  /** Inputs in place (downloaded or kept). */
  done: number;
  of: number;
  /** Bytes received by this attempt, all inputs together. */
  bytes: number;
  total: number;
}

export interface DownloadInputsOptions {
  /** Each input's path in the owner's space (also its path under `dir`) and size. */
  files: { path: string; size: number }[];
  /**
   * SHA-256 of the inputs already verified in place (by an earlier attempt): extended as inputs are
   * downloaded or found in place, so a retry skips them.
   */
  verified: Record<string, string>;
  /**
   * Whether each download is fsynced: false when the caller makes the home durable as a whole once it
   * is complete (HomeStaging.syncsInputs), which spares a journal commit per input.
   */
  sync: boolean;
  signal?: AbortSignal;
  onProgress?: (progress: InputProgress) => void;
  /** After each input is in place, with `verified` (what a retry resumes from). */
  onVerified?: (verified: Record<string, string>) => void;
}

/**
 * Downloads a task's inputs from `owner`'s space into `dir`, INPUT_DOWNLOADS_AT_ONCE at a time, each
 * checked against its size and SHA-256 on the way (RepositoryClient.download). An input an earlier
 * attempt left in place with the SHA-256 it verified, or the repository's, is kept. The first failure
 * stops the other downloads and is thrown once they have stopped; an input gone from the repository
 * is an InputNotFound.
 */
export async function downloadInputs(
  repository: RepositoryClient,
  owner: string,
  dir: string,
  opts: DownloadInputsOptions,
): Promise<{ downloaded: number; kept: number }> {
  const { files, verified } = opts;
  const stop = new AbortController();
  const signal = opts.signal ? AbortSignal.any([opts.signal, stop.signal]) : stop.signal;
  const total = files.reduce((n, f) => n + f.size, 0);
  let finishedBytes = 0;
  const receiving = new Map<string, number>();
  let done = 0;
  let downloaded = 0;
  let kept = 0;
  const made = new Set<string>();
  const report = (): void => {
    let bytes = finishedBytes;
    for (const b of receiving.values()) bytes += b;
    opts.onProgress?.({ done, of: files.length, bytes, total });
  };
  const one = async (file: { path: string; size: number }): Promise<void> => {
    const dest = path.join(dir, file.path);
    const sha256 = await keptCopy(repository, owner, file.path, dest, verified[file.path]);
    if (sha256) {
      verified[file.path] = sha256;
      kept++;
    } else {
      const folder = path.dirname(dest);
      // Once per folder: 1000 inputs in a few folders made 1000 mkdir calls.
      if (!made.has(folder)) {
        await fs.mkdir(folder, { recursive: true });
        made.add(folder);
      }
      receiving.set(file.path, 0);
      const info = await repository
        .download(owner, file.path, dest, {
          signal,
          sync: opts.sync,
          onProgress: (bytes) => {
            receiving.set(file.path, bytes);
            report();
          },
        })
        .catch((err: unknown) => {
          if (err instanceof RepositoryError && err.status === 404)
            throw new InputNotFound(file.path, owner, { cause: err });
          throw err;
        });
      receiving.delete(file.path);
      finishedBytes += info.size;
      verified[file.path] = info.sha256;
      downloaded++;
    }
    done++;
    report();
    opts.onVerified?.(verified);
  };
  await atOnce(
    files.length,
    INPUT_DOWNLOADS_AT_ONCE,
    (i) => one(files[i]),
    (err) => stop.abort(err),
  );
  return { downloaded, kept };
}

/**
 * The SHA-256 of `dest` when it already holds the repository's `input` (an earlier attempt's download):
 * the same size, and the SHA-256 that attempt verified, or the file's own, matching the repository's.
 */
async function keptCopy(
  repository: RepositoryClient,
  owner: string,
  input: string,
  dest: string,
  verifiedSha: string | undefined,
): Promise<string | undefined> {
  const have = await fs.stat(dest).catch(() => undefined);
  if (!have?.isFile()) return undefined;
  const remote = await repository.stat(owner, input);
  if (!remote || remote.size !== have.size) return undefined;
  const sha = verifiedSha ?? (await sha256File(dest));
  return sha === remote.sha256 ? sha : undefined;
}
