import os from 'node:os';
import path from 'node:path';
import { OWNER_NAME } from '../spec/repoPath';
import type { VmConfig } from './types';

/** Throws one error naming every problem of a VM config, the common ones and the driver's `extra`. */
export function checkVmConfig(c: VmConfig, extra: string[] = []): void {
  const bad: string[] = [];
  if (!OWNER_NAME.test(c.owner)) bad.push(`owner ${JSON.stringify(c.owner)} is not a valid owner name`);
  if (!c.command) bad.push('command is empty');
  if (!Number.isInteger(c.vcpus) || c.vcpus < 1 || c.vcpus > os.cpus().length * 4)
    bad.push(`vcpus ${c.vcpus} is out of range`);
  if (!Number.isInteger(c.memoryMiB) || c.memoryMiB < 64) bad.push(`memoryMiB ${c.memoryMiB} is below 64`);
  if (!Number.isInteger(c.timeLimitSec) || c.timeLimitSec < 1)
    bad.push(`timeLimitSec ${c.timeLimitSec} must be >= 1`);
  if (!c.baseImage || !path.isAbsolute(c.baseImage))
    bad.push('baseImage must be the absolute path of a cached image');
  for (const p of c.ports)
    if (!Number.isInteger(p) || p < 1 || p > 65535) bad.push(`port ${p} is out of range`);
  bad.push(...extra);
  if (bad.length > 0) throw new Error(`invalid VM config for ${c.vmId}: ${bad.join('; ')}`);
}
