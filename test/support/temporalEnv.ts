import { readFileSync } from 'node:fs';

import { temporalAddressFile } from './testRun';

/** host:port of the suite's Temporal dev server, started by jest's global setup. */
export function temporalAddress(): string {
  const fromEnv = process.env.TEMPORAL_ADDRESS;
  if (fromEnv) return fromEnv;
  // With --runInBand the tests run in the jest parent; in workers, the parent is ppid.
  for (const pid of [process.pid, process.ppid]) {
    try {
      return readFileSync(temporalAddressFile(pid), 'utf8').trim();
    } catch {
      // Not this one: try the next.
    }
  }
  throw new Error(
    'no Temporal dev server for tests: TEMPORAL_ADDRESS is unset (run the suite with jest, whose global setup starts one)',
  );
}
