import pino from 'pino';

/**
 * Structured JSON logs on stderr (stdout stays free for a command's own output). LOG_LEVEL sets the
 * level; each component gets a child logger with its name.
 */

/**
 * Fields that may hold a secret (a request's headers, an API token, a task capability, a password):
 * replaced wherever a log call passes them, top level or one object down, so a careless field never
 * writes a credential to a log file.
 */
const SECRET_FIELDS = ['authorization', 'token', 'capability', 'password', 'repositoryToken'];
const REDACTED_PATHS = [
  ...SECRET_FIELDS.flatMap((f) => [f, `*.${f}`]),
  'headers.authorization',
  '*.headers.authorization',
  'req.headers.authorization',
  '*.req.headers.authorization',
];

export const LOGGER_OPTIONS: pino.LoggerOptions = {
  level: process.env.LOG_LEVEL ?? 'info',
  base: { pid: process.pid },
  redact: { paths: REDACTED_PATHS, censor: '[redacted]' },
};

const root = pino(LOGGER_OPTIONS, pino.destination(2));

export type Logger = pino.Logger;

export function createLogger(component: string, bindings: Record<string, unknown> = {}): Logger {
  return root.child({ component, ...bindings });
}

/** An error with its cause chain, for log fields and messages. */
export function describeError(err: unknown): string {
  const parts: string[] = [];
  let e: unknown = err;
  for (let depth = 0; e && depth < 5; depth++) {
    parts.push(e instanceof Error ? e.message : String(e));
    e = e instanceof Error ? e.cause : undefined;
  }
  return parts.join(': caused by: ');
}
