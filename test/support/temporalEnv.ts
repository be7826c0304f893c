import { readFileSync } from 'node:fs';

import { temporalAddressFile, temporalUiFile } from './testRun';

/** What jest's global setup wrote to `file(pid)`: with --runInBand the tests run in the jest parent; in workers, the parent is ppid. */
function fromSetup(file: (jestPid: number) => string): string | undefined {
  for (const pid of [process.pid, process.ppid]) {
    try {
      return readFileSync(file(pid), 'utf8').trim();
    } catch {
      // Not this one: try the next.
    }
  }
  return undefined;
}

/** host:port of the suite's Temporal dev server, started by jest's global setup. */
export function temporalAddress(): string {
  const found = process.env.TEMPORAL_ADDRESS || fromSetup(temporalAddressFile);
  if (found) return found;
  throw new Error(
    'no Temporal dev server for tests: TEMPORAL_ADDRESS is unset (run the suite with jest, whose global setup starts one)',
  );
}

/** The suite's Temporal web UI (http://host:port), started with its dev server. */
export function temporalUiUrl(): string {
  const found = fromSetup(temporalUiFile);
  if (found) return found;
  throw new Error('no Temporal web UI for tests: run the suite with jest, whose global setup starts one');
}
