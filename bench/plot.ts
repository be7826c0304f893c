import { promises as fs } from 'node:fs';
import path from 'node:path';
import { runCommand } from '../lib/runCommand';
import { fsyncFile, writeFileAtomic } from '../storage/durableFile';

/**
 * Benchmark figures: a CSV per figure and a PNG line chart drawn from it by gnuplot (pngcairo). The
 * gnuplot script is kept beside the PNG, so `cd <folder> && gnuplot <name>.gp` redraws it by hand.
 */

export type CsvRow = Record<string, number | string>;

export interface ChartSeries {
  /** CSV column plotted against the chart's x column. */
  column: string;
  title: string;
  /** Drawn dashed (so a series that coincides with another stays visible). */
  dashed?: boolean;
}

/** One graph of a chart; panels are stacked top to bottom and share the x axis. */
export interface ChartPanel {
  ylabel: string;
  series: ChartSeries[];
  /** Upper end of the y axis (values above are clipped); default: fitted to the data. */
  yMax?: number;
  /** A line of text in the panel's top left corner (say what was clipped, for instance). */
  note?: string;
  /**
   * 'lines' joins the points; 'steps' holds each value over the interval that ends at its x (rates
   * measured over the past interval, like bytes per second sampled once a second). Default 'lines'.
   */
  style?: 'lines' | 'steps';
}

/** A span of x shaded in every panel, with its label (a migration window, say). */
export interface MarkedInterval {
  from: number;
  to: number;
  label: string;
}

export interface LineChart {
  title: string;
  /** The CSV the chart reads; must lie in the PNG's folder. */
  csvFile: string;
  xColumn: string;
  xLabel: string;
  panels: ChartPanel[];
  intervals?: MarkedInterval[];
  widthPx?: number;
  /** Per panel. */
  panelHeightPx?: number;
}

const COLUMN_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
const GNUPLOT_TIMEOUT_MS = 60_000;
const INTERVAL_COLOURS = ['#ffd9b3', '#cfe2ff', '#d9f2d9'];

function csvCell(v: number | string): string {
  if (typeof v === 'number') {
    if (!Number.isFinite(v)) throw new Error(`CSV value ${v} is not a finite number`);
    return String(v);
  }
  return /[",\n]/.test(v) ? `"${v.replace(/"/g, '""')}"` : v;
}

/** Writes rows (all with the keys of the first, in that order) as CSV with a header line, atomically. */
export async function writeCsv(file: string, rows: CsvRow[]): Promise<void> {
  if (rows.length === 0) throw new Error(`no rows to write to ${file}`);
  const columns = Object.keys(rows[0]);
  for (const c of columns)
    if (!COLUMN_NAME.test(c)) throw new Error(`CSV column ${JSON.stringify(c)} must be an identifier`);
  const lines = [columns.join(',')];
  for (const [i, row] of rows.entries()) {
    const missing = columns.filter((c) => !(c in row));
    if (missing.length > 0 || Object.keys(row).length !== columns.length)
      throw new Error(
        `CSV row ${i} of ${file} has other columns than the first (missing: ${missing.join(', ')})`,
      );
    lines.push(columns.map((c) => csvCell(row[c])).join(','));
  }
  await writeFileAtomic(file, lines.join('\n') + '\n');
}

/** A gnuplot single-quoted string (a quote inside is doubled). */
const quoted = (s: string) => `'${s.replace(/'/g, "''")}'`;

function validateChart(chart: LineChart, pngFile: string): void {
  const bad: string[] = [];
  if (!pngFile.endsWith('.png')) bad.push(`output ${pngFile} must end in .png`);
  if (path.dirname(path.resolve(chart.csvFile)) !== path.dirname(path.resolve(pngFile)))
    bad.push(`CSV ${chart.csvFile} must be in the folder of ${pngFile}`);
  if (chart.panels.length === 0) bad.push('a chart needs at least one panel');
  for (const c of [chart.xColumn, ...chart.panels.flatMap((p) => p.series.map((s) => s.column))])
    if (!COLUMN_NAME.test(c)) bad.push(`column ${JSON.stringify(c)} must be an identifier`);
  for (const p of chart.panels) if (p.series.length === 0) bad.push(`panel '${p.ylabel}' has no series`);
  for (const iv of chart.intervals ?? [])
    if (!(Number.isFinite(iv.from) && Number.isFinite(iv.to) && iv.from <= iv.to))
      bad.push(`interval '${iv.label}' runs from ${iv.from} to ${iv.to}`);
  if (bad.length > 0) throw new Error(`invalid chart '${chart.title}': ${bad.join('; ')}`);
}

/** The gnuplot script: file names relative to the PNG's folder, the output file overridable with -e out=. */
export function lineChartScript(chart: LineChart, pngFile: string): string {
  validateChart(chart, pngFile);
  const csv = quoted(path.basename(chart.csvFile));
  const width = chart.widthPx ?? 1200;
  const height = (chart.panelHeightPx ?? 340) * chart.panels.length + 40;
  const lines = [
    `if (!exists("out")) out = ${quoted(path.basename(pngFile))}`,
    `set terminal pngcairo size ${width},${height} font 'sans,10'`,
    'set output out',
    "set datafile separator ','",
    'set grid',
    // Fixed margins, so the stacked panels share one x scale whatever their labels and keys.
    'set lmargin 10',
    'set rmargin at screen 0.74',
    'set key outside right top',
    'set autoscale xfix',
    `set xlabel ${quoted(chart.xLabel)}`,
    `set multiplot layout ${chart.panels.length},1 title ${quoted(chart.title)} font 'sans,12'`,
  ];
  for (const [i, iv] of (chart.intervals ?? []).entries()) {
    // At least a visible sliver, however short the interval.
    const to = Math.max(iv.to, iv.from + 0.3);
    const colour = INTERVAL_COLOURS[i % INTERVAL_COLOURS.length];
    lines.push(
      `set object ${i + 1} rect from first ${iv.from}, graph 0 to first ${to}, graph 1 behind ` +
        `fillcolor rgb '${colour}' fillstyle solid 1.0 noborder`,
      `set label ${i + 1} ${quoted(iv.label)} at first ${to}, graph 0.96 left offset 0.5,0 front`,
    );
  }
  const noteTag = (chart.intervals?.length ?? 0) + 1;
  for (const p of chart.panels) {
    lines.push(`set ylabel ${quoted(p.ylabel)}`);
    lines.push(p.yMax === undefined ? 'set yrange [0:*]' : `set yrange [0:${p.yMax}]`);
    lines.push(
      p.note === undefined
        ? `unset label ${noteTag}`
        : `set label ${noteTag} ${quoted(p.note)} at graph 0.01, graph 0.9 left front`,
    );
    const style = p.style === 'steps' ? 'fsteps' : 'lines';
    const plots = p.series.map(
      (s, i) =>
        `${i === 0 ? csv : "''"} using ${quoted(chart.xColumn)}:${quoted(s.column)} with ${style} ` +
        `lw 2 dashtype ${s.dashed ? 2 : 1} title ${quoted(s.title)}`,
    );
    lines.push(`plot ${plots.join(', \\\n     ')}`);
  }
  lines.push('unset multiplot', 'set output');
  return lines.join('\n') + '\n';
}

/**
 * Draws `chart` into `pngFile` with gnuplot, atomically (a temp PNG, fsync, rename), and keeps the
 * script as `<name>.gp` beside it. Returns the script's path.
 */
export async function plotLineChart(chart: LineChart, pngFile: string): Promise<string> {
  const script = lineChartScript(chart, pngFile);
  const dir = path.dirname(path.resolve(pngFile));
  const scriptFile = path.join(dir, `${path.basename(pngFile, '.png')}.gp`);
  await writeFileAtomic(scriptFile, script);
  const tmp = `${path.resolve(pngFile)}.${process.pid}.tmp`;
  try {
    await runCommand('gnuplot', ['-e', `cd ${quoted(dir)}`, '-e', `out=${quoted(tmp)}`, scriptFile], {
      timeoutMs: GNUPLOT_TIMEOUT_MS,
    });
    await fsyncFile(tmp);
    await fs.rename(tmp, pngFile);
  } catch (err) {
    await fs.rm(tmp, { force: true });
    throw new Error(`gnuplot could not draw ${pngFile} (script ${scriptFile})`, { cause: err });
  }
  return scriptFile;
}
