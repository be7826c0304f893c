import { setTimeout as sleep } from 'node:timers/promises';
import { processCpuSeconds } from '../../drivers/cpuShare';

/**
 * CPU a set of processes uses per second of wall time (1.0 = one core busy), over `windowMs`: their
 * user + system seconds from /proc at both ends. `pids` is asked at both ends (a tree may change); a
 * process gone by the end counts what it had used at the start as spent.
 */
export async function measureCpuRate(pids: () => Promise<number[]>, windowMs: number): Promise<number> {
  const total = async (list: number[]) => {
    let sum = 0;
    for (const pid of list) sum += (await processCpuSeconds(pid)) ?? 0;
    return sum;
  };
  const t0 = performance.now();
  const before = await total(await pids());
  // The rate is what is measured: a window of wall time is the measurement, not a wait for a condition.
  await sleep(windowMs);
  const after = await total(await pids());
  return (after - before) / ((performance.now() - t0) / 1000);
}
