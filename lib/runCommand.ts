import { execFile } from 'node:child_process';

export interface RunResult {
  stdout: string;
  stderr: string;
}

/**
 * Runs a tool (qemu-img, mke2fs, debugfs...) with a hard time bound; rejects with the tool's stderr so
 * errors say what the tool said. No shell: arguments are never interpreted.
 */
export function runCommand(
  file: string,
  args: string[],
  opts: { timeoutMs?: number; maxBuffer?: number; signal?: AbortSignal; env?: NodeJS.ProcessEnv } = {},
): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 120_000;
  return new Promise((resolve, reject) => {
    execFile(
      file,
      args,
      {
        timeout: timeoutMs,
        killSignal: 'SIGKILL',
        maxBuffer: opts.maxBuffer ?? 16 * 1024 * 1024,
        // A cancelled activity kills its tool rather than leave it writing beside the next attempt.
        signal: opts.signal,
        ...(opts.env ? { env: opts.env } : {}),
      },
      (err, stdout, stderr) => {
        if (err) {
          const e = err as NodeJS.ErrnoException & { killed?: boolean };
          const why = opts.signal?.aborted
            ? 'stopped: the step was cancelled'
            : e.killed
              ? `timed out after ${timeoutMs} ms`
              : e.code === 'ENOENT'
                ? 'not installed (run deploy/setup.sh)'
                : stderr.trim() || e.message;
          reject(new Error(`${file} ${args.join(' ')}: ${why}`, { cause: err }));
          return;
        }
        resolve({ stdout, stderr });
      },
    );
  });
}
