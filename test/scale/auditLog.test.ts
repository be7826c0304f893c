import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import type { Pool } from 'pg';
import { addOwner } from '../../repository/accounts/admin';
import { AuditShipper } from '../../repository/accounts/auditShipper';
import { RepositoryClient } from '../../repository/client';
import { openPgPool } from '../../repository/store/pgMetadata';
import { createLogger } from '../../logging/logger';
import { clusterServers } from '../support/repositoryBackends';

// The audit log on `cluster`: every server's events in one PostgreSQL table, each stored once.
let pool: Pool;
// Before the fleet's: hooks run in order, and the fleet's last one drops the database.
afterAll(() => pool?.end());
const fleet = clusterServers(2, 'audit');
let token: string;

beforeAll(async () => {
  token = (await addOwner(fleet.dirs[0], 'alice')).token;
  pool = openPgPool(process.env.VSP_REPOSITORY_PG_URL as string, 2);
});

interface Row {
  server: string;
  owner: string | null;
  actor: string | null;
  action: string;
  result: string;
}

async function rowsWhere(where: string, want: number): Promise<Row[]> {
  for (;;) {
    const { rows } = await pool.query<Row>(
      `SELECT server, owner, actor, action, result FROM audit_log WHERE ${where} ORDER BY time, pos`,
    );
    if (rows.length >= want) return rows;
    // The shippers run every half second: wait for the rows, not for a guessed time (jest's timeout bounds it).
    await new Promise((r) => setTimeout(r, 100));
  }
}

test("what any server audits is in PostgreSQL, marked with that server's id", async () => {
  const [a, b] = fleet.servers.map((s) => new RepositoryClient({ url: s.url, token }));
  await a.upload('alice', 'audited.txt', Readable.from([Buffer.from('hello')]));
  const back = path.join(fleet.dirs[1], 'back.txt');
  await b.download('alice', 'audited.txt', back);
  expect(await fs.readFile(back, 'utf8')).toBe('hello');
  const stranger = new RepositoryClient({ url: fleet.servers[1].url, token: 'not-a-token-0123456789' });
  await expect(stranger.list('alice')).rejects.toThrow();

  const upload = await rowsWhere("action = 'upload' AND owner = 'alice'", 1);
  const download = await rowsWhere("action = 'download' AND owner = 'alice'", 1);
  const denied = await rowsWhere("result = 'denied'", 1);
  expect(upload[0]).toMatchObject({ actor: 'alice', result: 'ok' });
  expect(download[0].server).not.toBe(upload[0].server);
  expect(denied[0].server).toBe(download[0].server);
  const ids = await Promise.all(fleet.dirs.map((d) => fs.readFile(path.join(d, 'server-id'), 'utf8')));
  expect(ids.map((s) => s.trim()).sort()).toEqual([upload[0].server, download[0].server].sort());
});

test('a restarted shipper goes on where its rows end: no line twice, a torn last line waits', async () => {
  const file = path.join(fleet.dirs[0], 'shipper-test.log');
  const line = (n: number) =>
    `${JSON.stringify({ time: new Date().toISOString(), protocol: 'http', action: `a${n}`, result: 'ok' })}\n`;
  await fs.writeFile(file, line(1) + line(2));
  const log = createLogger('test');
  const first = new AuditShipper(pool, file, 'server-t', log);
  await first.ship();
  // More lines, the last one half written (the server is mid-write).
  const torn = line(4);
  await fs.appendFile(file, line(3) + torn.slice(0, 10));
  await first.ship();
  // A new shipper (the server restarted) starts from the table, not from zero.
  await fs.appendFile(file, torn.slice(10));
  await new AuditShipper(pool, file, 'server-t', log).ship();
  const rows = await rowsWhere("server = 'server-t'", 4);
  expect(rows.map((r) => r.action)).toEqual(['a1', 'a2', 'a3', 'a4']);
});
