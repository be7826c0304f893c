import { promises as fs } from 'node:fs';
import { runCommand } from '../lib/runCommand';
import { readProcStat } from '../drivers/processLiveness';

/**
 * Per-second host traces for the benchmarks' figures: CPU of each test host's processes (the VM's QEMU
 * apart from the rest, i.e. the NFS server: the paper's Domain-0) and the traffic on its uplink.
 */

const SAMPLE_MS = 1000;
const KiB = 1024;

export interface HostRates {
  /** Percent of one core used by the host's QEMU process(es). */
  qemuCpu: number;
  /** Percent of one core used by everything else in the host's namespace (nfs-ganesha, rpcbind). */
  servicesCpu: number;
  sentKiBs: number;
  recvKiBs: number;
}

export interface HostTraceSample<H extends string> {
  /** Seconds since the trace began, at the end of the interval the rates cover. */
  t: number;
  hosts: Record<H, HostRates>;
}

interface ProcTicks {
  comm: string;
  ticks: number;
}

/** utime + stime (all threads) and the command name from /proc/<pid>/stat; undefined once it is gone. */
async function readTicks(pid: number): Promise<ProcTicks | undefined> {
  const stat = await readProcStat(pid);
  if (!stat) return undefined;
  // utime and stime are fields 14 and 15.
  return { comm: stat.comm, ticks: Number(stat.fields[11]) + Number(stat.fields[12]) };
}

async function readCounter(file: string): Promise<number> {
  return Number((await fs.readFile(file, 'utf8')).trim());
}

/**
 * Samples every host once a second. The root-namespace end of a host's veth is named like its namespace
 * (deploy/devcluster/netns.ts): what it receives, the host sent, and the other way round. A process's
 * CPU is the growth of its ticks since the last sample (all of them for one that appeared meanwhile).
 */
export class HostTraceSampler<H extends string> {
  private readonly samples: HostTraceSample<H>[] = [];
  private readonly lastTicks = new Map<number, number>();
  private readonly lastNet = new Map<H, { rx: number; tx: number }>();
  private lastAt = 0;
  private stopped = false;
  private loop?: Promise<void>;

  private constructor(
    private readonly netns: Record<H, string>,
    private readonly clockTicks: number,
    readonly t0: number,
  ) {}

  static async start<H extends string>(netns: Record<H, string>): Promise<HostTraceSampler<H>> {
    const { stdout } = await runCommand('getconf', ['CLK_TCK'], { timeoutMs: 10_000 });
    const sampler = new HostTraceSampler(netns, Number(stdout.trim()) || 100, Date.now());
    for (const h of sampler.hosts) {
      const link = `/sys/class/net/${netns[h]}/statistics`;
      await fs.access(link).catch((err: unknown) => {
        throw new Error(`cannot read the traffic counters of host ${h} (${link})`, { cause: err });
      });
    }
    await sampler.read();
    sampler.loop = sampler.run();
    return sampler;
  }

  private get hosts(): H[] {
    return Object.keys(this.netns) as H[];
  }

  /** Seconds since the trace began. */
  since(at: number): number {
    return (at - this.t0) / 1000;
  }

  async stop(): Promise<HostTraceSample<H>[]> {
    this.stopped = true;
    await this.loop;
    return this.samples;
  }

  private async run(): Promise<void> {
    for (let k = 1; !this.stopped; k++) {
      const wait = this.t0 + k * SAMPLE_MS - Date.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      if (this.stopped) break;
      const sample = await this.read();
      this.samples.push({ ...sample, t: k });
    }
  }

  private async read(): Promise<Omit<HostTraceSample<H>, 't'>> {
    const pidsOf = new Map<H, number[]>();
    for (const h of this.hosts) {
      const { stdout } = await runCommand('ip', ['netns', 'pids', this.netns[h]], { timeoutMs: 10_000 });
      pidsOf.set(h, stdout.split(/\s+/).filter(Boolean).map(Number));
    }
    const at = Date.now();
    const seconds = (at - this.lastAt) / 1000;
    const hosts = {} as Record<H, HostRates>;
    const seen = new Set<number>();
    for (const h of this.hosts) {
      const rates: HostRates = { qemuCpu: 0, servicesCpu: 0, sentKiBs: 0, recvKiBs: 0 };
      for (const pid of pidsOf.get(h) ?? []) {
        const now = await readTicks(pid);
        if (!now) continue;
        seen.add(pid);
        const percent = (100 * (now.ticks - (this.lastTicks.get(pid) ?? 0))) / this.clockTicks / seconds;
        this.lastTicks.set(pid, now.ticks);
        if (now.comm.startsWith('qemu-system')) rates.qemuCpu += percent;
        else rates.servicesCpu += percent;
      }
      const dir = `/sys/class/net/${this.netns[h]}/statistics`;
      const net = { rx: await readCounter(`${dir}/rx_bytes`), tx: await readCounter(`${dir}/tx_bytes`) };
      const last = this.lastNet.get(h) ?? net;
      rates.sentKiBs = (net.rx - last.rx) / KiB / seconds;
      rates.recvKiBs = (net.tx - last.tx) / KiB / seconds;
      this.lastNet.set(h, net);
      hosts[h] = rates;
    }
    for (const pid of this.lastTicks.keys()) if (!seen.has(pid)) this.lastTicks.delete(pid);
    this.lastAt = at;
    return { hosts };
  }
}
