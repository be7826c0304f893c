import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { plotLineChart, writeCsv, type LineChart } from '../../bench/plot';

/** The benchmarks' figures: CSV written as given, PNG drawn by the real gnuplot. */
describe('benchmark plots', () => {
  let dir: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-plot-'));
  });

  afterAll(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  test('a CSV keeps its columns and rows, quoting text that needs it', async () => {
    const file = path.join(dir, 'rows.csv');
    await writeCsv(file, [
      { t: 1, note: 'plain' },
      { t: 2, note: 'with, "comma"' },
    ]);
    expect(await fs.readFile(file, 'utf8')).toBe('t,note\n1,plain\n2,"with, ""comma"""\n');
  });

  test('rows with other columns, bad names and non-finite numbers are refused', async () => {
    const file = path.join(dir, 'bad.csv');
    await expect(writeCsv(file, [{ a: 1 }, { b: 2 }])).rejects.toThrow('row 1');
    await expect(writeCsv(file, [{ 'a b': 1 }])).rejects.toThrow('must be an identifier');
    await expect(writeCsv(file, [{ a: Number.NaN }])).rejects.toThrow('not a finite number');
    await expect(writeCsv(file, [])).rejects.toThrow('no rows');
    await expect(fs.stat(file)).rejects.toThrow();
  });

  test('gnuplot draws a PNG of stacked panels with a marked interval, and keeps its script', async () => {
    const csvFile = path.join(dir, 'trace.csv');
    await writeCsv(
      csvFile,
      Array.from({ length: 30 }, (_, t) => ({
        t,
        cpu: 50 + 40 * Math.sin(t / 3),
        net: t > 10 && t < 14 ? 900 : 5,
      })),
    );
    const chart: LineChart = {
      title: "Trace with 'quotes'",
      csvFile,
      xColumn: 't',
      xLabel: 'seconds',
      panels: [
        { ylabel: 'CPU %', series: [{ column: 'cpu', title: 'QEMU' }], yMax: 100 },
        { ylabel: 'KiB/s', series: [{ column: 'net', title: 'sent', dashed: true }], style: 'steps' },
      ],
      intervals: [{ from: 11, to: 13, label: 'migration' }],
    };
    const png = path.join(dir, 'trace.png');
    const script = await plotLineChart(chart, png);
    const bytes = await fs.readFile(png);
    expect(bytes.subarray(0, 8)).toEqual(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]));
    // Width and height from the PNG header: the default width, one height share per panel.
    expect(bytes.readUInt32BE(16)).toBe(1200);
    expect(bytes.readUInt32BE(20)).toBe(2 * 340 + 40);
    expect(await fs.readFile(script, 'utf8')).toContain("'migration'");
    expect((await fs.readdir(dir)).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });

  test('a chart whose CSV is elsewhere or that names a bad column is refused before gnuplot runs', async () => {
    const base: LineChart = {
      title: 'x',
      csvFile: path.join(os.tmpdir(), 'elsewhere.csv'),
      xColumn: 't',
      xLabel: 't',
      panels: [{ ylabel: 'y', series: [{ column: 'bad column', title: 'y' }] }],
    };
    await expect(plotLineChart(base, path.join(dir, 'bad.png'))).rejects.toThrow(
      /must be in the folder of .*; column "bad column" must be an identifier/,
    );
  });
});
