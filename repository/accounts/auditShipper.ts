import { randomUUID } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Pool } from 'pg';
import { readRange } from '../../lib/fileRange';
import { describeError, type Logger } from '../../logging/logger';

/**
 * On the `cluster` backend every server's audit log also lands in PostgreSQL, one table for all servers,
 * so an operator asks one place who did what. Each event is first written to the server's own JSON-lines
 * file, synchronously, before the client hears the answer (auditLog.ts); this ships the file's complete
 * lines to the table shortly after, keyed by server and byte position, so a line sent twice (a crash
 * between insert and the next read) is stored once, and a restarted server goes on where its rows end.
 */

/** The table, as a step of the repository's schema migrations (store/pgMetadata.ts). */
export const AUDIT_LOG_TABLE = `
CREATE TABLE audit_log (
  server TEXT NOT NULL,
  pos BIGINT NOT NULL,
  next_pos BIGINT NOT NULL,
  time TIMESTAMPTZ NOT NULL,
  owner TEXT,
  actor TEXT,
  action TEXT NOT NULL,
  result TEXT NOT NULL,
  event JSONB NOT NULL,
  PRIMARY KEY (server, pos)
);
CREATE INDEX audit_log_by_owner ON audit_log (owner, time);
CREATE INDEX audit_log_by_time ON audit_log (time);
`;

/** How often new lines are looked for; an event is in PostgreSQL about this long after it happened. */
const SHIP_INTERVAL_MS = 500;
/** Bytes read per batch: one multi-row insert. */
const BATCH_BYTES = 256 * 1024;

/** A data dir's server id: made once, so the rows of one audit file keep one key across restarts. */
export async function serverIdOf(dataDir: string): Promise<string> {
  const file = path.join(dataDir, 'server-id');
  const existing = await fs.readFile(file, 'utf8').catch(() => undefined);
  if (existing?.trim()) return existing.trim();
  const id = randomUUID();
  await fs
    .writeFile(file, `${id}\n`, { mode: 0o600, flag: 'wx' })
    .catch(async (err: NodeJS.ErrnoException) => {
      if (err.code !== 'EEXIST') throw err;
    });
  return (await fs.readFile(file, 'utf8')).trim();
}

export class AuditShipper {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> = Promise.resolve();
  private offset: number | undefined;

  constructor(
    private readonly pool: Pool,
    private readonly file: string,
    private readonly server: string,
    private readonly log: Logger,
  ) {}

  /** Ships what is there now, then keeps shipping in the background until `close`. */
  start(): void {
    const tick = (): void => {
      this.running = this.running.then(() => this.shipSafely());
      this.timer = setTimeout(tick, SHIP_INTERVAL_MS);
      this.timer.unref();
    };
    tick();
  }

  /** Stops the timer and ships the last lines (a server that closes leaves nothing behind unshipped). */
  async close(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    await (this.running = this.running.then(() => this.shipSafely()));
  }

  private async shipSafely(): Promise<void> {
    try {
      await this.ship();
    } catch (err) {
      // The file keeps every event: the next tick tries again from the last row stored.
      this.offset = undefined;
      this.log.warn({ err: describeError(err), file: this.file }, 'audit events not yet in PostgreSQL');
    }
  }

  /** Ships every complete line from the last one stored on. */
  async ship(): Promise<void> {
    let offset = (this.offset ??= await this.storedUpTo());
    for (;;) {
      const chunk = await readRange(this.file, offset, BATCH_BYTES);
      const end = chunk.lastIndexOf(0x0a) + 1;
      if (end === 0) return;
      const rows: unknown[][] = [];
      for (const line of chunk.subarray(0, end).toString('utf8').split('\n').slice(0, -1)) {
        const next: number = offset + Buffer.byteLength(line) + 1;
        const e = parseEvent(line);
        if (e) rows.push([this.server, offset, next, e.time, e.owner, e.user, e.action, e.result, line]);
        offset = next;
      }
      if (rows.length > 0) await this.insert(rows);
      this.offset = offset;
    }
  }

  private async insert(rows: unknown[][]): Promise<void> {
    const width = rows[0].length;
    const values = rows.map((_, r) => `(${rows[0].map((__, c) => `$${r * width + c + 1}`).join(', ')})`);
    await this.pool.query(
      `INSERT INTO audit_log (server, pos, next_pos, time, owner, actor, action, result, event)
       VALUES ${values.join(', ')} ON CONFLICT (server, pos) DO NOTHING`,
      rows.flat(),
    );
  }

  private async storedUpTo(): Promise<number> {
    const { rows } = await this.pool.query<{ upto: number | null }>(
      'SELECT max(next_pos) AS upto FROM audit_log WHERE server = $1',
      [this.server],
    );
    return Number(rows[0]?.upto ?? 0);
  }
}

interface ShippedEvent {
  time: string;
  owner?: string;
  user?: string;
  action: string;
  result: string;
}

/** A line as the audit log writes it; anything else (a torn or foreign line) is skipped, not shipped. */
function parseEvent(line: string): ShippedEvent | undefined {
  try {
    const e = JSON.parse(line) as Partial<ShippedEvent>;
    if (typeof e.time !== 'string' || typeof e.action !== 'string' || typeof e.result !== 'string')
      return undefined;
    return e as ShippedEvent;
  } catch {
    return undefined;
  }
}
