import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createLogger, describeError, type Logger } from '../../logging/logger';
import { buildBundle, type Bundle } from './bundle';
import { loadDeploySecrets, type DeployInventory } from './inventory';
import {
  fileChange,
  HOST_WORKER_UNIT,
  INSTALL_LINK,
  planHost,
  RELEASE_MARKER,
  RELEASES_DIR,
  serviceAction,
  staleReleases,
  storageChanges,
  workerIdentityPrefix,
  type HostPlan,
  type StepName,
} from './plan';
import { SshSession } from './sshSession';
import { connectPollerCheck, type PollerCheck } from './workerCheck';

/**
 * `vsp cluster deploy`: every host of the inventory at once, each over its own SSH session, step by step
 * (plan.ts). A host that fails stops at that step and leaves the others to finish; the report names the
 * host, the step and the cause. The checks run once every host has deployed, since each host checks that
 * it mounts the others' exports.
 */

export type StepStatus = 'changed' | 'unchanged' | 'failed' | 'skipped';

export interface StepReport {
  name: StepName;
  status: StepStatus;
  ms: number;
  /** What changed or was found, one line each. */
  details: string[];
  error?: string;
}

export interface HostReport {
  host: string;
  address: string;
  ok: boolean;
  /** The failed step and its cause. */
  failed?: { step: StepName; error: string };
  steps: StepReport[];
  ms: number;
  /** The worker's poller identity the check saw. */
  worker?: string;
}

export interface DeployReport {
  ok: boolean;
  release: { sha256: string; bytes: number };
  hosts: HostReport[];
  ms: number;
}

export interface DeployOptions {
  /** The project whose build is deployed (dist/ and node_modules/). */
  projectDir: string;
  /** How long the check waits for the restarted worker to poll. */
  workerTimeoutMs?: number;
  /** Called as each host step ends (progress display). */
  onStep?: (host: string, step: StepReport) => void;
}

const log = createLogger('deploy.cluster');

/** Deploys to every host in parallel; resolves with the report (it throws only before any connection). */
export async function deployCluster(inv: DeployInventory, o: DeployOptions): Promise<DeployReport> {
  const t0 = Date.now();
  const { privateKey, repositoryToken } = await loadDeploySecrets(inv);
  const unitFile = await fs.readFile(
    path.join(o.projectDir, 'deploy', 'production', 'systemd', HOST_WORKER_UNIT),
    'utf8',
  );
  const plans = inv.hosts.map((h) => planHost(inv, h, repositoryToken, unitFile));
  const bundle = await buildBundle(o.projectDir);
  log.info(
    { sha256: bundle.sha256, bytes: bundle.bytes, hosts: inv.hosts.map((h) => h.name) },
    'release built',
  );
  let poller: Promise<PollerCheck> | undefined;
  const runs = plans.map((plan) => new HostRun(inv, plan, privateKey, bundle, o));
  try {
    await Promise.all(runs.map((r) => r.deploy()));
    const failedPeers = new Map(
      runs.filter((r) => r.report.failed).map((r) => [r.report.host, r.report.failed as { step: StepName }]),
    );
    const pollers = () =>
      (poller ??= connectPollerCheck(inv.cluster.temporalAddress, inv.cluster.temporalNamespace));
    await Promise.all(runs.filter((r) => !r.report.failed).map((r) => r.check(failedPeers, pollers)));
  } finally {
    runs.forEach((r) => r.close());
    await bundle.dispose();
    await poller?.then((p) => p.close()).catch(() => undefined);
  }
  const hosts = runs.map((r) => r.report);
  return {
    ok: hosts.every((h) => h.ok),
    release: { sha256: bundle.sha256, bytes: bundle.bytes },
    hosts,
    ms: Date.now() - t0,
  };
}

/** Single-quoted for the remote shell. */
export function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

class StepFailure extends Error {}

/** One host's deploy: its session, its steps and its report. */
class HostRun {
  readonly report: HostReport;
  private session?: SshSession;
  private readonly log: Logger;
  private readonly t0 = Date.now();
  private changed = { release: false, workerFiles: false, unit: false };
  private mainPid = 0;

  constructor(
    private readonly inv: DeployInventory,
    private readonly plan: HostPlan,
    private readonly privateKey: Buffer,
    private readonly bundle: Bundle,
    private readonly o: DeployOptions,
  ) {
    this.report = { host: plan.host.name, address: plan.host.address, ok: false, steps: [], ms: 0 };
    this.log = log.child({ host: plan.host.name });
  }

  private get ssh(): SshSession {
    if (!this.session) throw new Error('not connected');
    return this.session;
  }

  async deploy(): Promise<void> {
    const h = this.plan.host;
    try {
      await this.step('connect', async () => {
        this.session = await SshSession.connect({
          name: h.name,
          address: h.address,
          port: this.inv.ssh.port,
          user: this.inv.ssh.user,
          privateKey: this.privateKey,
          hostKey: h.hostKey,
        });
        return { changed: false, details: [`${this.inv.ssh.user}@${h.address}, host key verified`] };
      });
      await this.step('preflight', () => this.preflight());
      await this.step('release', () => this.release());
      await this.step('account', () => this.account());
      await this.step('config', () => this.config());
      await this.step('storage', () => this.storage());
      await this.step('appliance', () => this.appliance());
      await this.step('service', () => this.service());
    } catch (err) {
      if (!(err instanceof StepFailure)) throw err;
    } finally {
      this.report.ms = Date.now() - this.t0;
    }
  }

  async check(
    failedPeers: Map<string, { step: StepName }>,
    pollers: () => Promise<PollerCheck>,
  ): Promise<void> {
    try {
      await this.step('check', () => this.checks(failedPeers, pollers));
      this.report.ok = true;
    } catch (err) {
      if (!(err instanceof StepFailure)) throw err;
    } finally {
      this.report.ms = Date.now() - this.t0;
    }
  }

  close(): void {
    this.session?.close();
  }

  private async step(
    name: StepName,
    body: () => Promise<{ changed: boolean; details: string[] }>,
  ): Promise<void> {
    const t = Date.now();
    this.log.info({ step: name }, 'step started');
    try {
      const r = await body();
      const s: StepReport = {
        name,
        status: r.changed ? 'changed' : 'unchanged',
        ms: Date.now() - t,
        details: r.details,
      };
      this.report.steps.push(s);
      this.log.info({ step: name, status: s.status, ms: s.ms, details: r.details }, 'step done');
      this.o.onStep?.(this.report.host, s);
    } catch (err) {
      const error = describeError(err);
      const s: StepReport = { name, status: 'failed', ms: Date.now() - t, details: [], error };
      this.report.steps.push(s);
      this.report.failed = { step: name, error };
      this.log.error({ step: name, ms: s.ms, err: error }, 'step failed');
      this.o.onStep?.(this.report.host, s);
      throw new StepFailure(error);
    }
  }

  private async preflight() {
    const out = await this.ssh.run(
      [
        'echo "uid=$(id -u)"',
        'echo "arch=$(uname -m)"',
        'echo "node=$(node --version 2>/dev/null)"',
        'for t in systemctl exportfs mount.nfs tar gzip sha256sum findmnt useradd xl; do',
        '  command -v "$t" > /dev/null 2>&1 && echo "tool=$t"',
        'done',
        'true',
      ].join('\n'),
    );
    const facts = parseFacts(out);
    const bad = preflightProblems(facts, this.inv.cluster.driver);
    if (bad.length > 0) throw new Error(bad.join('; '));
    return { changed: false, details: [`node ${facts.node}, ${facts.arch}`] };
  }

  private async release() {
    const { sha256 } = this.bundle;
    const dir = `${RELEASES_DIR}/${sha256}`;
    const state = parseFacts(
      await this.ssh.run(
        [
          `[ -f ${shq(`${dir}/${RELEASE_MARKER}`)} ] && echo present=1`,
          `if [ -L ${INSTALL_LINK} ]; then echo "link=$(readlink ${INSTALL_LINK})"; elif [ -e ${INSTALL_LINK} ]; then echo notlink=1; fi`,
          `ls -1t ${RELEASES_DIR} 2>/dev/null | sed 's/^/release=/'`,
          'true',
        ].join('\n'),
      ),
    );
    if (state.notlink)
      throw new Error(
        `${INSTALL_LINK} is a folder, not the deploy's link to a release (an installation by hand?): move it away first`,
      );
    const details: string[] = [];
    let changed = false;
    if (!state.present) {
      const incoming = `${RELEASES_DIR}/.incoming-${sha256}`;
      const t = Date.now();
      await this.ssh.run(`mkdir -p ${RELEASES_DIR} && rm -rf ${incoming} ${incoming}.tar.gz`);
      await this.ssh.upload(this.bundle.file, `cat > ${incoming}.tar.gz`);
      details.push(
        `sent ${(this.bundle.bytes / 1e6).toFixed(1)} MB in ${((Date.now() - t) / 1000).toFixed(1)} s`,
      );
      await this.ssh.run(
        [
          'set -e',
          `echo '${sha256}  ${incoming}.tar.gz' | sha256sum -c --quiet`,
          `mkdir ${incoming}`,
          `tar -xzf ${incoming}.tar.gz -C ${incoming} --no-same-owner`,
          `echo ${sha256} > ${incoming}/${RELEASE_MARKER}`,
          `rm -rf ${dir}`,
          `mv ${incoming} ${dir}`,
          `rm -f ${incoming}.tar.gz`,
        ].join('\n'),
        { timeoutMs: 10 * 60_000 },
      );
      changed = true;
    }
    const previous = state.link ? path.posix.basename(state.link) : undefined;
    if (state.link !== dir) {
      await this.ssh.run(
        `ln -sfn ${dir} ${INSTALL_LINK}.vsp-new && mv -T ${INSTALL_LINK}.vsp-new ${INSTALL_LINK}`,
      );
      details.push(`${INSTALL_LINK} -> ${dir}${previous ? ` (was ${previous.slice(0, 12)})` : ''}`);
      changed = true;
    }
    this.changed.release = changed;
    const stale = staleReleases(state.release ?? [], sha256).concat(
      (state.release ?? []).filter((r) => r.startsWith('.incoming-') && r !== `.incoming-${sha256}`),
    );
    if (stale.length > 0) {
      await this.ssh.run(`cd ${RELEASES_DIR} && rm -rf ${stale.map(shq).join(' ')}`);
      details.push(`removed ${stale.length} old release(s)`);
    }
    if (!changed) details.push(`release ${sha256.slice(0, 12)} already installed`);
    return { changed, details };
  }

  private async account() {
    const { user, uid, gid } = this.inv.cluster.qemuAccount;
    const out = await this.ssh.run(
      [
        `n=${shq(user)}; uid=${uid}; gid=${gid}`,
        'if g=$(getent group "$n"); then',
        '  [ "$(echo "$g" | cut -d: -f3)" = "$gid" ] || { echo "group $n has gid $(echo "$g" | cut -d: -f3), the inventory says $gid" >&2; exit 3; }',
        'else',
        '  if o=$(getent group "$gid"); then echo "gid $gid is group ${o%%:*}\'s" >&2; exit 3; fi',
        '  groupadd --system --gid "$gid" "$n" && echo created-group',
        'fi',
        'if id -u "$n" > /dev/null 2>&1; then',
        '  [ "$(id -u "$n"):$(id -g "$n")" = "$uid:$gid" ] || { echo "user $n is $(id -u "$n"):$(id -g "$n"), the inventory says $uid:$gid" >&2; exit 3; }',
        'else',
        '  if o=$(getent passwd "$uid"); then echo "uid $uid is ${o%%:*}\'s" >&2; exit 3; fi',
        '  useradd --system --uid "$uid" --gid "$gid" --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$n" && echo created-user',
        'fi',
      ].join('\n'),
    );
    const created = out.split('\n').filter((l) => l.startsWith('created-'));
    return {
      changed: created.length > 0,
      details: created.length ? [`created ${user} (${uid}:${gid})`] : [],
    };
  }

  private async config() {
    // One round trip to read every file, one to write those that differ (contents on stdin, never in a
    // command line that `ps` shows).
    const current = parseFileDump(
      await this.ssh.run(
        this.plan.files
          .map(
            (f) =>
              `echo "== $(stat -c %a ${shq(f.path)} 2>/dev/null || echo -)"; base64 -w0 ${shq(f.path)} 2>/dev/null; echo`,
          )
          .join('\n'),
      ),
    );
    const writes: string[] = [];
    const details: string[] = [];
    this.plan.files.forEach((file, i) => {
      const { action, content } = fileChange(file, current[i]?.content, current[i]?.mode);
      if (action === 'unchanged') return;
      writes.push(`${file.mode.toString(8)} ${file.path} ${Buffer.from(content).toString('base64')}`);
      details.push(`${action === 'create' ? 'created' : 'updated'} ${file.path}`);
      if (file.restartsWorker) this.changed.workerFiles = true;
      if (file.path.endsWith(HOST_WORKER_UNIT)) this.changed.unit = true;
    });
    if (writes.length > 0)
      await this.ssh.run(
        [
          'set -e',
          'umask 077',
          'while read -r mode f data; do',
          '  mkdir -p "$(dirname "$f")"',
          '  printf %s "$data" | base64 -d > "$f.vsp-new"',
          '  chmod "$mode" "$f.vsp-new"',
          '  mv -f "$f.vsp-new" "$f"',
          'done',
        ].join('\n'),
        { stdin: `${writes.join('\n')}\n` },
      );
    return { changed: details.length > 0, details };
  }

  private async storage() {
    const out = await this.ssh.run(this.plan.storageCommand.map(shq).join(' '), { timeoutMs: 5 * 60_000 });
    const changes = storageChanges(out);
    return { changed: changes.length > 0, details: changes };
  }

  private async appliance() {
    const r = await this.ssh.exec(
      `bash ${INSTALL_LINK}/deploy/guest/build-appliance.sh ${shq(this.inv.cluster.applianceDir)}`,
      { timeoutMs: 15 * 60_000 },
    );
    if (r.code !== 0)
      throw new Error(
        `the guest appliance did not build: ${r.stderr.trim().split('\n').slice(-4).join(' | ')}`,
      );
    const built = /building appliance/.test(r.stderr);
    return {
      changed: built,
      details: [`${built ? 'built' : 'up to date'}: ${r.stdout.trim().split('\n').pop()}`],
    };
  }

  private async service() {
    const unit = HOST_WORKER_UNIT;
    const state = parseFacts(
      await this.ssh.run(
        [
          ...(this.changed.unit ? ['systemctl daemon-reload'] : []),
          `echo "enabled=$(systemctl is-enabled ${unit})"`,
          `echo "active=$(systemctl is-active ${unit})"`,
          'true',
        ].join('\n'),
      ),
    );
    const details: string[] = [];
    const commands: string[] = [];
    if (state.enabled !== 'enabled') {
      commands.push(`systemctl enable --quiet ${unit}`);
      details.push(`enabled ${unit}`);
    }
    const action = serviceAction(state.active === 'active', this.changed);
    if (action !== 'none') {
      commands.push(`systemctl ${action} ${unit}`);
      details.push(`${action === 'start' ? 'started' : 'restarted'} ${unit}`);
    }
    commands.push(`systemctl show -p MainPID --value ${unit}`);
    this.mainPid = Number((await this.ssh.run(commands.join(' && '))).trim().split('\n').pop());
    if (!this.mainPid) throw new Error(`${unit} is not running: ${await this.journal()}`);
    return { changed: details.length > 0, details };
  }

  private async checks(failedPeers: Map<string, { step: StepName }>, pollers: () => Promise<PollerCheck>) {
    const details: string[] = [];
    if (this.inv.cluster.driver === 'xen') {
      const info = parseXlInfo(await this.ssh.run('xl info', { timeoutMs: 30_000 }));
      details.push(
        `xl info: xen ${info.xen_version ?? '?'}, ${info.virt_caps ?? '?'}, free ${info.free_memory ?? '?'} MB`,
      );
    }
    for (const m of this.plan.peerMounts) {
      const failed = failedPeers.get(m.host);
      if (failed) {
        details.push(`${m.where}: not checked, ${m.host} failed at ${failed.step}`);
        continue;
      }
      // The automount mounts on first access; a peer that does not answer must not hang the check (hard mounts).
      const r = await this.ssh.exec(
        `timeout -s KILL 60 ls ${shq(m.where)} > /dev/null && findmnt -n -o SOURCE,FSTYPE -t nfs,nfs4 --mountpoint ${shq(m.where)}`,
        { timeoutMs: 90_000 },
      );
      const [source, fstype] = r.stdout.trim().split(/\s+/);
      if (r.code !== 0 || source !== m.source)
        throw new Error(
          `${m.host}'s export ${m.source} is not mounted at ${m.where}${r.stderr.trim() ? `: ${r.stderr.trim()}` : ` (found ${r.stdout.trim() || 'nothing'})`}`,
        );
      details.push(`${m.where} <- ${source} (${fstype})`);
    }
    const prefix = workerIdentityPrefix(this.plan.host.name, this.mainPid);
    try {
      this.report.worker = await (
        await pollers()
      ).waitForPoller(this.plan.taskQueue, prefix, this.o.workerTimeoutMs ?? 180_000);
    } catch (err) {
      throw new Error(`${describeError(err)}; worker log: ${await this.journal()}`, { cause: err });
    }
    details.push(`${this.report.worker} polls ${this.plan.taskQueue}`);
    return { changed: false, details };
  }

  /** The worker's last log lines, for a failure's cause. */
  private async journal(): Promise<string> {
    const r = await this.ssh.exec(`journalctl -u ${HOST_WORKER_UNIT} -n 5 --no-pager -o cat`);
    return r.stdout.trim().split('\n').join(' | ') || '(empty)';
  }
}

/** `key=value` lines; repeated keys collect into arrays (see the `release` and `tool` facts). */
export function parseFacts(text: string): Record<string, string> & { release?: string[]; tool?: string[] } {
  const facts: Record<string, string | string[]> = {};
  for (const line of text.split('\n')) {
    const i = line.indexOf('=');
    if (i <= 0) continue;
    const [k, v] = [line.slice(0, i), line.slice(i + 1)];
    if (k === 'release' || k === 'tool') facts[k] = [...((facts[k] as string[]) ?? []), v];
    else facts[k] = v;
  }
  return facts as Record<string, string> & { release?: string[]; tool?: string[] };
}

/** What keeps a host from running this build, from the preflight facts. */
export function preflightProblems(
  facts: ReturnType<typeof parseFacts>,
  driver: string,
  local: { nodeMajor: string; arch: string } = {
    nodeMajor: process.versions.node.split('.')[0],
    arch: process.arch,
  },
): string[] {
  const bad: string[] = [];
  if (facts.uid !== '0') bad.push(`the deploy needs root on the host (ssh.user logs in as uid ${facts.uid})`);
  const arch = local.arch === 'x64' ? 'x86_64' : local.arch === 'arm64' ? 'aarch64' : local.arch;
  if (facts.arch !== arch) bad.push(`the host is ${facts.arch}, this build is for ${arch}`);
  const major = /^v(\d+)\./.exec(facts.node ?? '')?.[1];
  if (!major) bad.push('node is not installed (Node.js 20 or later, in PATH)');
  else if (major !== local.nodeMajor)
    bad.push(
      `node ${facts.node} on the host, but the build's native modules are for Node ${local.nodeMajor}: install Node ${local.nodeMajor}`,
    );
  const tools = new Set(facts.tool ?? []);
  const need: [string, string][] = [
    ['systemctl', 'systemd'],
    ['exportfs', 'nfs-kernel-server'],
    ['mount.nfs', 'nfs-common'],
    ['tar', 'tar'],
    ['gzip', 'gzip'],
    ['sha256sum', 'coreutils'],
    ['findmnt', 'util-linux'],
    ['useradd', 'passwd'],
    ...(driver === 'xen' ? ([['xl', 'xen-utils (boot the host under Xen)']] as [string, string][]) : []),
  ];
  for (const [tool, pkg] of need) if (!tools.has(tool)) bad.push(`${tool} is missing (${pkg})`);
  return bad;
}

/** The files as the config step's read prints them: `== <mode|->` then the content in base64. */
export function parseFileDump(text: string): ({ mode: number; content: string } | undefined)[] {
  const lines = text.split('\n');
  const files: ({ mode: number; content: string } | undefined)[] = [];
  for (let i = 0; i < lines.length; i++) {
    const m = /^== (\d+|-)$/.exec(lines[i]);
    if (!m) continue;
    const data = lines[i + 1] ?? '';
    files.push(
      m[1] === '-'
        ? undefined
        : { mode: parseInt(m[1], 8), content: Buffer.from(data, 'base64').toString('utf8') },
    );
    i++;
  }
  return files;
}

/** `xl info`'s `key : value` lines. */
export function parseXlInfo(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^(\w+)\s*:\s*(.*)$/.exec(line);
    if (m) out[m[1]] = m[2].trim();
  }
  return out;
}
