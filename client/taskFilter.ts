import { HOST_NAME, SEARCH_ATTRIBUTES } from '../config/names';
import type { TaskPhase } from '../workflows/definitions';

/**
 * Which tasks a listing returns: the owners' task API (`?phase=&host=&since=`), VspClient.list (a
 * Temporal visibility query) and `vsp list` share these checks, so each refuses the same values with
 * the same message.
 */
export interface TaskListFilter {
  /** Only running tasks (Temporal's execution status). */
  running?: boolean;
  /** Only tasks whose last recorded phase (VspPhase) is this one. */
  phase?: TaskPhase;
  /** Only tasks whose VM runs (or last ran) on this host (VspHost). */
  host?: string;
  /** Only tasks started at or after this time. */
  since?: Date;
  /** At most this many, newest first. */
  limit?: number;
}

// Every phase once: the compiler refuses a missing or unknown one, so the list follows TaskPhase.
const PHASES: Record<TaskPhase, true> = {
  validating: true,
  placing: true,
  queued: true,
  'staging-in': true,
  creating: true,
  starting: true,
  running: true,
  'staging-out': true,
  'awaiting-repository': true,
  destroying: true,
  completed: true,
  failed: true,
  cancelled: true,
};
export const TASK_PHASES = Object.keys(PHASES) as TaskPhase[];

export function checkPhase(text: string): TaskPhase {
  if (!Object.hasOwn(PHASES, text))
    throw new Error(`phase '${text}' is not a task phase: use one of ${TASK_PHASES.join(', ')}`);
  return text as TaskPhase;
}

export function checkHost(text: string): string {
  if (!HOST_NAME.test(text))
    throw new Error(`host '${text}' is not a host name (lower-case letters, digits and '-', at most 63)`);
  return text;
}

/** An ISO 8601 time with a date and, when it has a time of day, a zone (`Z` or `+02:00`). */
const ISO_TIME = /^\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:\d{2}))?$/;

/** A time given as ISO 8601 (a date alone is midnight UTC); a time of day without its zone is ambiguous. */
export function parseIsoTime(text: string, what = 'since'): Date {
  const t = ISO_TIME.test(text) ? new Date(text) : undefined;
  if (!t || Number.isNaN(t.getTime()))
    throw new Error(
      `${what} '${text}' is not an ISO 8601 time with its zone (e.g. 2026-12-01T17:00:00Z or 2026-12-01)`,
    );
  return t;
}

/** Seconds in "90s", "30m", "2h", "7d", "1h30m", or plain seconds. */
export function parseDuration(text: string): number {
  const t = text.trim();
  if (/^\d+$/.test(t)) return Number(t);
  const parts = [...t.matchAll(/(\d+)([smhd])/g)];
  if (!parts.length || parts.map((p) => p[0]).join('') !== t)
    throw new Error(`invalid duration '${text}': use e.g. 90s, 30m, 2h, 7d or 1h30m`);
  const unit: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86400 };
  return parts.reduce((sum, p) => sum + Number(p[1]) * unit[p[2]], 0);
}

/** `--since`: an ISO 8601 time, or a duration back from `now` (1h = started in the last hour). */
export function parseSince(text: string, now = Date.now()): Date {
  if (/^\d{4}-/.test(text)) return parseIsoTime(text);
  try {
    return new Date(now - parseDuration(text) * 1000);
  } catch {
    // The message names both forms; the duration parser's alone would mislead.
    throw new Error(
      `since '${text}' is neither an ISO 8601 time (e.g. 2026-12-01T17:00:00Z) nor a duration (e.g. 90s, 30m, 1h, 7d)`,
    );
  }
}

/** The filter as the task API's query parameters (`since` absolute, so client and server agree). */
export function filterToQuery(filter: TaskListFilter): URLSearchParams {
  const q = new URLSearchParams();
  if (filter.running) q.set('running', '1');
  if (filter.phase !== undefined) q.set('phase', filter.phase);
  if (filter.host !== undefined) q.set('host', filter.host);
  if (filter.since !== undefined) q.set('since', filter.since.toISOString());
  if (filter.limit !== undefined) q.set('limit', String(filter.limit));
  return q;
}

/** The task API's query parameters, checked (the limit is the caller's: its bound is the server's). */
export function filterFromQuery(q: URLSearchParams): Omit<TaskListFilter, 'limit'> {
  const phase = q.get('phase');
  const host = q.get('host');
  const since = q.get('since');
  return {
    running: q.get('running') === '1',
    ...(phase === null ? {} : { phase: checkPhase(phase) }),
    ...(host === null ? {} : { host: checkHost(host) }),
    ...(since === null ? {} : { since: parseIsoTime(since) }),
  };
}

/** The visibility query for an owner's (or, for operators, every owner's) tasks that pass the filter. */
export function visibilityQuery(filter: TaskListFilter & { owner?: string }): string {
  const clauses = [`WorkflowType="TaskLifecycle"`];
  // Owner names are checked where they come from; dropping quotes keeps a bad one from widening the query.
  if (filter.owner) clauses.push(`${SEARCH_ATTRIBUTES.owner}="${filter.owner.replace(/"/g, '')}"`);
  if (filter.running) clauses.push(`ExecutionStatus="Running"`);
  if (filter.phase !== undefined) clauses.push(`${SEARCH_ATTRIBUTES.phase}="${checkPhase(filter.phase)}"`);
  if (filter.host !== undefined) clauses.push(`${SEARCH_ATTRIBUTES.host}="${checkHost(filter.host)}"`);
  if (filter.since !== undefined) clauses.push(`StartTime >= "${filter.since.toISOString()}"`);
  return clauses.join(' AND ');
}
