import { runCommand } from '../../lib/runCommand';
import { startPostgres, type TestDatabase } from '../support/postgres';

/** psql against a URL (never prompting for a password): what any client of the test cluster sees. */
async function sql(url: string, query: string): Promise<string> {
  return (await runCommand('psql', ['-w', url, '-v', 'ON_ERROR_STOP=1', '-qtAc', query])).stdout.trim();
}

describe('test PostgreSQL (deploy/postgres/, test/support/postgres.ts)', () => {
  const dbs: TestDatabase[] = [];
  afterAll(async () => {
    for (const db of dbs) await db.stop();
  });

  it('gives each call a fresh database that only its own role can open, and drops it on stop', async () => {
    const [a, b] = await Promise.all([startPostgres(), startPostgres()]);
    dbs.push(a, b);
    const urlA = new URL(a.url);
    const urlB = new URL(b.url);
    expect(urlA.hostname).toBe('127.0.0.1');
    expect(urlA.port).toBe(urlB.port);
    expect(urlA.pathname).not.toBe(urlB.pathname);

    await sql(a.url, 'CREATE TABLE t (v text); INSERT INTO t VALUES ($$kept$$)');
    expect(await sql(a.url, 'SELECT v FROM t')).toBe('kept');
    expect(await sql(b.url, "SELECT count(*) FROM pg_tables WHERE tablename = 't'")).toBe('0');

    // B's role and password, A's database: refused.
    const crossed = new URL(b.url);
    crossed.pathname = urlA.pathname;
    await expect(sql(crossed.toString(), 'SELECT 1')).rejects.toThrow(/permission denied|CONNECT privilege/);
    // No password: refused (the superuser has no TCP login either).
    await expect(sql(`postgres://postgres@127.0.0.1:${urlA.port}/postgres`, 'SELECT 1')).rejects.toThrow(
      /password/,
    );

    await b.stop();
    await expect(sql(b.url, 'SELECT 1')).rejects.toThrow(/does not exist/);
    expect(await sql(a.url, 'SELECT v FROM t')).toBe('kept');
  });
});
