import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Client, Connection, WorkflowNotFoundError } from '@temporalio/client';
import { SCHEDULER_WORKFLOW_ID, hostLivenessWorkflowId } from '../../config/names';
import { syncRebalanceSchedule } from '../../client/rebalanceSchedule';
import { createLogger, describeError } from '../../logging/logger';
import { TaskClient, type OwnerTaskSpec, type SubmittedTask } from '../../client/taskClient';
import type { ClusterStorage } from '../../storage/diskLocator';
import { startNfsExport, type RunningNfsExport } from '../../storage/nfsExport';
import type { VmNetworkOptions } from '../../drivers/qemu/vmNetwork';
import { HOST_BRIDGE, inNetns, type TestNetwork } from './netns';
import { freePort } from './ports';
import { FAULT_DIR_ENV } from './faultHoldFiles';
import { spawnManaged, type ManagedProcess } from './processes';
import { issueMigrationCerts } from './migrationCerts';
import { repoRoot } from './tools';

const log = createLogger('devcluster.local');

export interface LocalClusterOptions {
  /** Temporal front end to use (host:port). */
  temporalAddress: string;
  /** Its namespace (default `default`, the dev server's). */
  temporalNamespace?: string;
  /** Host names; each gets a worker and a VM store under baseDir. */
  hosts: string[];
  /** Holds the repository data, host stores and logs. */
  baseDir: string;
  /** VSP_DRIVERS for every host worker (default: process). */
  drivers?: string[];
  /** Extra environment for the host workers. */
  hostEnv?: NodeJS.ProcessEnv;
  /** Extra environment for the control worker. */
  controlEnv?: NodeJS.ProcessEnv;
  /** Owners to create, with a token each. */
  owners?: string[];
  /**
   * Fault suite: the workers preload the activity holds (faultHolds.ts), which watch this folder for the
   * holds a test asks for.
   */
  faultDir?: string;
  /**
   * Namespace mode (needs root): each host worker runs inside its test host (a network namespace of
   * `network`, one per host name) next to an NFS export of its store, and every host worker gets the
   * cluster's storage map and VM network. The repository then listens on the network's gateway address; Temporal
   * (`temporalAddress`) must be reachable from the namespaces too, e.g. a dev server bound to the gateway.
   */
  testHosts?: { network: TestNetwork; exportPath?: string };
  /**
   * The hosts' workers run elsewhere (installed on real hosts by `vsp cluster deploy`): `start()` runs the
   * repository and the control worker only.
   */
  remoteHosts?: boolean;
  /** Where the repository listens (default: a free port on loopback or the test network's gateway). */
  repositoryListen?: { host: string; port: number };
  /** The repository's service token (default: a random one), e.g. the one deployed host workers got. */
  serviceToken?: string;
}

/**
 * A new token of `owner` in the repository at `repoDir`, through the admin path (the `vsp` admin CLI, run
 * to completion: callers want the token at once): the owner is created the first time.
 */
export function ownerTokenIn(repoDir: string, owner: string): string {
  const vsp = <T>(...args: string[]): T => {
    const r = spawnSync(process.execPath, [path.join(repoRoot(), 'dist/cli/vsp.js'), '--json', ...args], {
      encoding: 'utf8',
      env: { ...process.env, VSP_REPO_DIR: repoDir },
    });
    if (r.status !== 0)
      throw new Error(`vsp ${args.join(' ')} failed: ${r.stderr.trim() || r.error?.message}`);
    return JSON.parse(r.stdout) as T;
  };
  return vsp<{ name: string }[]>('owner', 'list').some((o) => o.name === owner)
    ? vsp<{ token: string }>('token', 'create', owner, 'devcluster').token
    : vsp<{ token: string }>('owner', 'add', owner).token;
}

/**
 * The embedded dev cluster on one machine: a repository service, a control worker and one host
 * worker per host, all real processes (compiled JS under dist/), all stopped by `stop()`.
 */
export class LocalCluster {
  readonly hostProcs = new Map<string, ManagedProcess>();
  readonly ownerTokens = new Map<string, string>();
  /** Namespace mode: each host's NFS export. */
  readonly exports = new Map<string, RunningNfsExport>();
  repositoryUrl = '';
  private repository?: ManagedProcess;
  private repositoryListen?: { host: string; port: number };
  /** Control workers, oldest first (a cluster may run several: they share the scheduler). */
  private controls: ManagedProcess[] = [];
  /** Namespace mode: each host's migration credentials (VSP_MIGRATION_TLS_DIR). */
  private migrationTlsDirs: Record<string, string> = {};
  private readonly serviceToken: string;

  constructor(readonly opts: LocalClusterOptions) {
    this.serviceToken = opts.serviceToken ?? `vsp_${randomBytes(32).toString('base64url')}`;
    this.repositoryListen = opts.repositoryListen;
  }

  /** The repository's process (fault tests pause and resume it). */
  get repositoryProcess(): ManagedProcess | undefined {
    return this.repository;
  }

  get temporalNamespace(): string {
    return this.opts.temporalNamespace ?? 'default';
  }

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
    return {
      ...process.env,
      TEMPORAL_ADDRESS: this.opts.temporalAddress,
      TEMPORAL_NAMESPACE: this.temporalNamespace,
    };
  }

  /** node's arguments for a worker entry point, with the fault holds preloaded when asked. */
  private workerArgs(rel: string): string[] {
    const preload = this.opts.faultDir ? ['--require', this.js('deploy/devcluster/faultHolds.js')] : [];
    return [...preload, this.js(rel)];
  }

  private faultEnv(): NodeJS.ProcessEnv {
    return this.opts.faultDir ? { [FAULT_DIR_ENV]: this.opts.faultDir } : {};
  }

  /** Namespace mode: every host's export, as host workers receive it (VSP_CLUSTER_STORAGE). */
  get clusterStorage(): ClusterStorage {
    const map: ClusterStorage = {};
    const testHosts = this.opts.testHosts;
    if (testHosts)
      for (const h of this.opts.hosts)
        map[h] = { address: this.testHost(h).address, exportPath: testHosts.exportPath ?? '/vsp' };
    return map;
  }

  /**
   * Namespace mode: the VM network every host worker receives (VSP_VM_NETWORK): the hosts' bridges are one
   * L2 segment, so a service VM answers at the same address on any host.
   */
  get vmNetwork(): VmNetworkOptions | undefined {
    const network = this.opts.testHosts?.network;
    return network && { bridge: HOST_BRIDGE, subnet: network.subnet };
  }

  private testHost(host: string) {
    const h = this.opts.testHosts?.network.hosts[host];
    if (!h) throw new Error(`host ${host} is not a test host of the network`);
    return h;
  }

  async start(): Promise<this> {
    // QEMU's unprivileged account reaches the host stores through the base folder, nothing else in it.
    await fs.mkdir(this.opts.baseDir, { recursive: true });
    if (this.opts.drivers?.includes('qemu')) await fs.chmod(this.opts.baseDir, 0o711);
    await fs.mkdir(this.logDir, { recursive: true, mode: 0o700 });
    await fs.mkdir(this.repoDir, { recursive: true, mode: 0o700 });
    if (this.opts.testHosts)
      this.migrationTlsDirs = await issueMigrationCerts(
        path.join(this.opts.baseDir, 'tls'),
        Object.fromEntries(this.opts.hosts.map((h) => [h, this.testHost(h).address])),
      );
    await this.startRepository();
    for (const owner of this.opts.owners ?? []) this.ownerToken(owner);
    if (this.opts.testHosts) await Promise.all(this.opts.hosts.map((h) => this.startExport(h)));
    await this.endClusterWorkflows('a new test cluster starts with a scheduler and host records of its own');
    const hostWorkers = this.opts.remoteHosts ? [] : this.opts.hosts.map((h) => this.startHost(h));
    await Promise.all([this.startControl(), ...hostWorkers]);
    log.info({ hosts: this.opts.hosts, repository: this.repositoryUrl }, 'local cluster ready');
    return this;
  }

  /** Starts the repository, or starts it again after a stop on the same address and data. */
  async startRepository(): Promise<void> {
    // Namespace hosts reach the root namespace only at the gateway address.
    if (!this.repositoryListen) {
      const gateway = this.opts.testHosts?.network.gateway ?? '127.0.0.1';
      this.repositoryListen = { host: gateway, port: await freePort(gateway) };
    }
    const { host, port } = this.repositoryListen;
    this.repository = await spawnManaged('repository', process.execPath, [this.js('repository/main.js')], {
      env: {
        ...this.baseEnv(),
        VSP_REPO_DIR: this.repoDir,
        VSP_REPO_LISTEN: `${host}:${port}`,
        VSP_REPO_SERVICE_TOKEN: this.serviceToken,
        // The web page's task endpoints (TEMPORAL_ADDRESS comes from the base environment).
        VSP_REPO_TEMPORAL: '1',
      },
      logFile: path.join(this.logDir, 'repository.log'),
      readyWhen: { port: { host, port }, logLine: /repository listening/ },
    });
    const proc = this.repository;
    // A repository that dies on its own is down too: a test may start it again.
    void proc.exited.then(() => {
      if (this.repository === proc) this.repository = undefined;
    });
    this.repositoryUrl = `http://${host}:${port}`;
  }

  /** Stops the repository (SIGKILL by default, as a crash would); its data stays for `startRepository`. */
  async stopRepository(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (!this.repository) throw new Error('the repository is not running');
    await this.repository.stop(signal, 10_000);
    this.repository = undefined;
  }

  /** The repository's pid, while it runs (undefined once it stopped or died). */
  get repositoryPid(): number | undefined {
    return this.repository?.pid;
  }

  /** Starts a control worker (one more, when some run already). */
  async startControl(): Promise<void> {
    const n = this.controls.length;
    const proc = await spawnManaged(
      n === 0 ? 'control-worker' : `control-worker-${n + 1}`,
      process.execPath,
      this.workerArgs('workers/controlWorker.js'),
      {
        env: {
          ...this.baseEnv(),
          VSP_HOSTS: this.opts.hosts.join(','),
          ...this.faultEnv(),
          ...this.opts.controlEnv,
        },
        logFile: path.join(this.logDir, n === 0 ? 'control-worker.log' : `control-worker-${n + 1}.log`),
        readyWhen: { logLine: /control worker ready/ },
        readyTimeoutMs: 120_000,
      },
    );
    this.controls.push(proc);
  }

  /** Namespace mode: the host's store exported over NFS from inside its namespace. */
  private async startExport(host: string): Promise<void> {
    const storeRoot = this.storeDir(host);
    await fs.mkdir(storeRoot, { recursive: true });
    const exp = await startNfsExport({
      hostName: host,
      storeRoot,
      endpoint: this.clusterStorage[host],
      stateDir: path.join(this.opts.baseDir, 'nfs', host),
      netns: this.testHost(host).netns,
    });
    this.exports.set(host, exp);
  }

  /** `wrap` runs the worker under another command (e.g. in a mount namespace with a tiny store). */
  async startHost(
    host: string,
    wrap?: (cmd: string, args: string[]) => { cmd: string; args: string[] },
  ): Promise<ManagedProcess> {
    const plain = this.opts.testHosts
      ? inNetns(this.testHost(host).netns, process.execPath, this.workerArgs('workers/hostWorker.js'))
      : { cmd: process.execPath, args: this.workerArgs('workers/hostWorker.js') };
    const worker = wrap ? wrap(plain.cmd, plain.args) : plain;
    const proc = await spawnManaged(`host-${host}`, worker.cmd, worker.args, {
      env: {
        ...this.baseEnv(),
        VSP_HOST: host,
        VSP_STORE_DIR: this.storeDir(host),
        VSP_REPOSITORY_URL: this.repositoryUrl,
        VSP_REPOSITORY_TOKEN: this.serviceToken,
        VSP_DRIVERS: (this.opts.drivers ?? ['process']).join(','),
        ...(this.opts.testHosts
          ? {
              VSP_CLUSTER_STORAGE: JSON.stringify(this.clusterStorage),
              VSP_VM_NETWORK: JSON.stringify(this.vmNetwork),
              VSP_MIGRATION_TLS_DIR: this.migrationTlsDirs[host],
              // `ip netns exec` mounts a fresh /sys without the cgroup hierarchies: the test hosts reach
              // the machine's through this process's root (CPU shares, drivers/cpuShare.ts).
              VSP_CGROUP_ROOT: `/proc/${process.pid}/root/sys/fs/cgroup`,
            }
          : {}),
        ...this.faultEnv(),
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

  /**
   * An owner's token, through the admin path: the owner is created (or given one more token) the first
   * time it is asked for.
   */
  ownerToken(owner: string): string {
    let token = this.ownerTokens.get(owner);
    if (token === undefined) {
      token = ownerTokenIn(this.repoDir, owner);
      this.ownerTokens.set(owner, token);
    }
    return token;
  }

  /** The owners' task API (the front door) as `owner`. */
  tasks(owner: string): TaskClient {
    return new TaskClient({ url: this.repositoryUrl, token: this.ownerToken(owner) });
  }

  /**
   * Submits a task as `owner` through the repository's task API, as an owner would: the repository
   * checks it and starts it with the task's capability.
   */
  submitTask(owner: string, spec: OwnerTaskSpec, opts: { taskId?: string } = {}): Promise<SubmittedTask> {
    return this.tasks(owner).submit(spec, opts);
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

  /** SIGKILL a control worker (the oldest), as a crash would. */
  async killControl(): Promise<void> {
    const control = this.controls.shift();
    if (!control) throw new Error('the control worker is not running');
    await control.stop('SIGKILL', 0);
  }

  async stop(): Promise<void> {
    const procs = [...this.hostProcs.values(), ...this.controls, this.repository].filter(
      (p): p is ManagedProcess => p !== undefined,
    );
    await Promise.all(procs.map((p) => p.stop('SIGTERM', 10_000)));
    this.hostProcs.clear();
    this.controls = [];
    await Promise.all([...this.exports.values()].map((e) => e.stop()));
    this.exports.clear();
    await this.endClusterWorkflows('its test cluster stopped').catch((err: unknown) =>
      log.warn({ err: describeError(err) }, "could not end the test cluster's scheduler and host records"),
    );
  }

  /**
   * Test clusters share one Temporal server, one after another, while a cluster's scheduler, its
   * rebalancing Schedule and its hosts' liveness records are long-lived, with fixed ids: each test cluster gets fresh ones,
   * not the reservations, hosts and payload key of the cluster before it (a history encrypted with
   * another key cannot be replayed).
   */
  private async endClusterWorkflows(why: string): Promise<void> {
    const connection = await Connection.connect({ address: this.opts.temporalAddress });
    const client = new Client({ connection, namespace: this.temporalNamespace });
    try {
      await syncRebalanceSchedule(client, undefined);
      for (const id of [SCHEDULER_WORKFLOW_ID, ...this.opts.hosts.map(hostLivenessWorkflowId)])
        await client.workflow
          .getHandle(id)
          .terminate(why)
          .catch((err: unknown) => {
            if (!(err instanceof WorkflowNotFoundError)) throw err;
          });
    } finally {
      await connection.close();
    }
  }
}
