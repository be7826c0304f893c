import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createLogger } from '../../logging/logger';
import { addOwner } from '../../repository/admin';
import { freePort } from './ports';
import { spawnManaged, type ManagedProcess } from './processes';
import { repoRoot } from './tools';

const log = createLogger('devcluster.local');

export interface LocalClusterOptions {
  /** Temporal front end to use (host:port). */
  temporalAddress: string;
  /** Host names; each gets a worker and a VM store under baseDir. */
  hosts: string[];
  /** Holds the repository data, host stores and logs. */
  baseDir: string;
  /** VSP_DRIVERS for every host worker (default: process). */
  drivers?: string[];
  /** Extra environment for the host workers. */
  hostEnv?: NodeJS.ProcessEnv;
  /** Owners to create, with a token each. */
  owners?: string[];
}

/**
 * The embedded dev cluster on one machine: a repository service, a control worker and one host
 * worker per host, all real processes (compiled JS under dist/), all stopped by `stop()`.
 */
export class LocalCluster {
  readonly hostProcs = new Map<string, ManagedProcess>();
  readonly ownerTokens = new Map<string, string>();
  repositoryUrl = '';
  private repository?: ManagedProcess;
  private control?: ManagedProcess;
  private readonly serviceToken = `vsp_${randomBytes(32).toString('base64url')}`;

  constructor(readonly opts: LocalClusterOptions) {}

  get logDir(): string {
    return path.join(this.opts.baseDir, 'logs');
  }

  get repoDir(): string {
    return path.join(this.opts.baseDir, 'repository');
  }

  storeDir(host: string): string {
    return path.join(this.opts.baseDir, 'hosts', host);
  }

  private js(rel: string): string {
    return path.join(repoRoot(), 'dist', rel);
  }

  private baseEnv(): NodeJS.ProcessEnv {
    return { ...process.env, TEMPORAL_ADDRESS: this.opts.temporalAddress, TEMPORAL_NAMESPACE: 'default' };
  }

  async start(): Promise<this> {
    await fs.mkdir(this.logDir, { recursive: true });
    const port = await freePort();
    this.repository = await spawnManaged('repository', process.execPath, [this.js('repository/main.js')], {
      env: {
        ...this.baseEnv(),
        VSP_REPO_DIR: this.repoDir,
        VSP_REPO_LISTEN: `127.0.0.1:${port}`,
        VSP_REPO_SERVICE_TOKEN: this.serviceToken,
      },
      logFile: path.join(this.logDir, 'repository.log'),
      readyWhen: { port: { host: '127.0.0.1', port }, logLine: /repository listening/ },
    });
    this.repositoryUrl = `http://127.0.0.1:${port}`;
    for (const owner of this.opts.owners ?? [])
      this.ownerTokens.set(owner, addOwner(this.repoDir, owner).token);
    await Promise.all([this.startControl(), ...this.opts.hosts.map((h) => this.startHost(h))]);
    log.info({ hosts: this.opts.hosts, repository: this.repositoryUrl }, 'local cluster ready');
    return this;
  }

  async startControl(): Promise<void> {
    this.control = await spawnManaged(
      'control-worker',
      process.execPath,
      [this.js('workers/controlWorker.js')],
      {
        env: { ...this.baseEnv(), VSP_HOSTS: this.opts.hosts.join(',') },
        logFile: path.join(this.logDir, 'control-worker.log'),
        readyWhen: { logLine: /control worker ready/ },
        readyTimeoutMs: 120_000,
      },
    );
  }

  async startHost(host: string): Promise<ManagedProcess> {
    const proc = await spawnManaged(`host-${host}`, process.execPath, [this.js('workers/hostWorker.js')], {
      env: {
        ...this.baseEnv(),
        VSP_HOST: host,
        VSP_STORE_DIR: this.storeDir(host),
        VSP_REPOSITORY_URL: this.repositoryUrl,
        VSP_REPOSITORY_TOKEN: this.serviceToken,
        VSP_DRIVERS: (this.opts.drivers ?? ['process']).join(','),
        ...this.opts.hostEnv,
      },
      logFile: path.join(this.logDir, `host-${host}.log`),
      readyWhen: {
        logLine: new RegExp(`"host":"${host}".*host worker ready|host worker ready.*"host":"${host}"`),
      },
      readyTimeoutMs: 60_000,
    });
    this.hostProcs.set(host, proc);
    return proc;
  }

  /** SIGKILL, as a crash would: VMs and task processes it started keep running. */
  async killHost(host: string): Promise<void> {
    const proc = this.hostProcs.get(host);
    if (!proc) throw new Error(`no worker for host ${host}`);
    // Only the worker: its task processes live in their own sessions, like VMs.
    process.kill(proc.pid, 'SIGKILL');
    await proc.exited;
    this.hostProcs.delete(host);
  }

  async stop(): Promise<void> {
    const procs = [...this.hostProcs.values(), this.control, this.repository].filter(
      (p): p is ManagedProcess => p !== undefined,
    );
    await Promise.all(procs.map((p) => p.stop('SIGTERM', 10_000)));
    this.hostProcs.clear();
  }
}
