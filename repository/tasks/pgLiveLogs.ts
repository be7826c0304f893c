import { EventEmitter } from 'node:events';
import type { Pool } from 'pg';
import {
  checkCapabilityId,
  DEFAULT_LIVE_LOG_BYTES,
  MAX_APPEND_BYTES,
  planAppend,
  type AppendResult,
  type LiveLogStore,
} from './liveLogs';
import { inTransaction } from '../store/pgTransaction';

/**
 * Live logs in PostgreSQL (the `cluster` backend): any repository server takes a host's appends and
 * serves any follower. A log is a row holding its size and the chunks as appended; an append locks the
 * row, so two servers taking the same retried append store its bytes once.
 */

/** The tables, as a step of the repository's schema migrations. */
export const LIVE_LOG_TABLES = `
CREATE TABLE live_logs (
  owner text NOT NULL,
  capability text NOT NULL,
  size bigint NOT NULL DEFAULT 0,
  updated timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (owner, capability)
);
CREATE TABLE live_log_chunks (
  owner text NOT NULL,
  capability text NOT NULL,
  start bigint NOT NULL,
  bytes bytea NOT NULL,
  PRIMARY KEY (owner, capability, start),
  FOREIGN KEY (owner, capability) REFERENCES live_logs ON DELETE CASCADE
);
`;

/** How often a follower on one server looks for bytes another server took. */
const GROWTH_POLL_MS = 250;
/** A chunk holds at most one append and the limit's note: reads look back no further for its start. */
const MAX_CHUNK_BYTES = MAX_APPEND_BYTES + 256;

export class PgLiveLogs implements LiveLogStore {
  /** Appends taken by this server wake its own followers at once; others' are seen by polling. */
  private readonly grew = new EventEmitter();

  constructor(
    private readonly pool: Pool,
    private readonly maxBytes = DEFAULT_LIVE_LOG_BYTES,
  ) {
    this.grew.setMaxListeners(0);
  }

  async size(owner: string, capabilityId: string): Promise<number> {
    checkCapabilityId(capabilityId);
    const { rows } = await this.pool.query<{ size: string }>(
      'SELECT size FROM live_logs WHERE owner = $1 AND capability = $2',
      [owner, capabilityId],
    );
    return rows.length === 0 ? 0 : Number(rows[0].size);
  }

  async append(
    owner: string,
    capabilityId: string,
    offset: number | undefined,
    bytes: Buffer,
  ): Promise<AppendResult> {
    checkCapabilityId(capabilityId);
    const { fresh, ...result } = await inTransaction(this.pool, async (client) => {
      await client.query('INSERT INTO live_logs (owner, capability) VALUES ($1, $2) ON CONFLICT DO NOTHING', [
        owner,
        capabilityId,
      ]);
      const { rows } = await client.query<{ size: string }>(
        'SELECT size FROM live_logs WHERE owner = $1 AND capability = $2 FOR UPDATE',
        [owner, capabilityId],
      );
      const size = Number(rows[0].size);
      const plan = planAppend(size, offset, bytes, this.maxBytes);
      if (plan.fresh.length > 0) {
        await client.query(
          'INSERT INTO live_log_chunks (owner, capability, start, bytes) VALUES ($1, $2, $3, $4)',
          [owner, capabilityId, size, plan.fresh],
        );
        await client.query(
          'UPDATE live_logs SET size = $3, updated = now() WHERE owner = $1 AND capability = $2',
          [owner, capabilityId, plan.size],
        );
      }
      return plan;
    });
    if (fresh.length > 0) this.grew.emit(`${owner}/${capabilityId}`);
    return result;
  }

  async read(owner: string, capabilityId: string, offset: number, max = MAX_APPEND_BYTES): Promise<Buffer> {
    checkCapabilityId(capabilityId);
    const { rows } = await this.pool.query<{ start: string; bytes: Buffer }>(
      `SELECT start, bytes FROM live_log_chunks
        WHERE owner = $1 AND capability = $2 AND start > $3::bigint - $5::bigint
          AND start < $3::bigint + $4::bigint AND start + length(bytes) > $3::bigint
        ORDER BY start`,
      [owner, capabilityId, offset, max, MAX_CHUNK_BYTES],
    );
    const parts = rows.map((r) => r.bytes.subarray(Math.max(0, offset - Number(r.start))));
    return Buffer.concat(parts).subarray(0, max);
  }

  async waitForGrowth(owner: string, capabilityId: string, ms: number, signal: AbortSignal): Promise<void> {
    const key = `${owner}/${capabilityId}`;
    const from = await this.size(owner, capabilityId);
    const deadline = Date.now() + ms;
    while (!signal.aborted && Date.now() < deadline) {
      const grewHere = await new Promise<boolean>((resolve) => {
        const done = (grew: boolean) => () => {
          clearTimeout(timer);
          this.grew.off(key, onGrew);
          signal.removeEventListener('abort', onAbort);
          resolve(grew);
        };
        const onGrew = done(true);
        const onAbort = done(false);
        const timer = setTimeout(done(false), Math.min(GROWTH_POLL_MS, Math.max(0, deadline - Date.now())));
        this.grew.on(key, onGrew);
        signal.addEventListener('abort', onAbort);
      });
      if (grewHere || (!signal.aborted && (await this.size(owner, capabilityId)) > from)) return;
    }
  }
}
