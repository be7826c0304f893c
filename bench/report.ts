import { promises as fs } from 'node:fs';
import path from 'node:path';

/** One benchmark's figures: printed as markdown and written as markdown + JSON under bench-results/. */
export interface BenchReport {
  name: string;
  title: string;
  /** Free text: what was measured and how. */
  method: string;
  /** Rows of a table; every row has the same keys. */
  rows: Record<string, string | number>[];
  /** Headline figures (ratios, medians) for the closing note. */
  summary: Record<string, string | number>;
}

export function toMarkdown(r: BenchReport): string {
  const lines = [`## ${r.title}`, '', r.method, ''];
  if (r.rows.length > 0) {
    const cols = Object.keys(r.rows[0]);
    lines.push(`| ${cols.join(' | ')} |`, `| ${cols.map(() => '---').join(' | ')} |`);
    for (const row of r.rows) lines.push(`| ${cols.map((c) => String(row[c] ?? '')).join(' | ')} |`);
    lines.push('');
  }
  for (const [k, v] of Object.entries(r.summary)) lines.push(`- **${k}**: ${v}`);
  return lines.join('\n') + '\n';
}

export async function writeReport(r: BenchReport, dir = 'bench-results'): Promise<string> {
  await fs.mkdir(dir, { recursive: true });
  const md = toMarkdown(r);
  await fs.writeFile(path.join(dir, `${r.name}.md`), md);
  await fs.writeFile(path.join(dir, `${r.name}.json`), JSON.stringify(r, null, 2) + '\n');
  process.stdout.write(md + '\n');
  return md;
}
