import type { DeployReport, HostReport, StepReport } from './deploy';
import type { HostPlan } from './plan';

/** Human-readable output of `vsp cluster deploy`: the plan (`--dry-run`), progress lines, the report. */

/** The plan per host: steps, then each file with its content (secrets replaced by where they come from). */
export function formatPlan(plans: HostPlan[], secrets: Record<string, string>): string {
  const out: string[] = [];
  for (const p of plans) {
    out.push(`host ${p.host.name} (${p.host.address})`);
    p.steps.forEach((s, i) => out.push(`  ${i + 1}. ${s.name.padEnd(9)} ${s.summary}`));
    for (const f of p.files) {
      let text = f.content;
      for (const [secret, from] of Object.entries(secrets)) text = text.split(secret).join(`<${from}>`);
      const what = `  ${f.path} (mode ${f.mode.toString(8)}${f.block ? ', its VSP block' : ''})`;
      if (f.source) out.push(`${what}: as ${f.source}`);
      else
        out.push(
          `${what}:`,
          ...text
            .trimEnd()
            .split('\n')
            .map((l) => `    | ${l}`),
        );
    }
  }
  return `${out.join('\n')}\n`;
}

export function formatStep(host: string, s: StepReport): string {
  const status = s.status === 'failed' ? `FAILED: ${s.error}` : s.status;
  const details = s.details.length > 0 && s.status !== 'failed' ? `: ${s.details.join('; ')}` : '';
  return `${host}: ${s.name} ${status} (${(s.ms / 1000).toFixed(1)} s)${details}`;
}

function hostLine(h: HostReport): string {
  const secs = `${(h.ms / 1000).toFixed(1)} s`;
  if (h.failed) return `${h.host}: FAILED at step ${h.failed.step} after ${secs}: ${h.failed.error}`;
  const changed = h.steps.filter((s) => s.status === 'changed').map((s) => s.name);
  return `${h.host}: deployed in ${secs}, ${changed.length > 0 ? `changed: ${changed.join(', ')}` : 'nothing changed'}`;
}

export function formatReport(r: DeployReport): string {
  const failed = r.hosts.filter((h) => h.failed).length;
  return (
    [
      `release ${r.release.sha256.slice(0, 12)} (${(r.release.bytes / 1e6).toFixed(1)} MB)`,
      ...r.hosts.map(hostLine),
      failed === 0
        ? `all ${r.hosts.length} host(s) deployed in ${(r.ms / 1000).toFixed(1)} s`
        : `${failed} of ${r.hosts.length} host(s) failed; the others are deployed`,
    ].join('\n') + '\n'
  );
}
