import type { IncomingMessage } from 'node:http';

/** A request refused with a status and a message for the client. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

/** How long a small body may take to arrive (uploads are bounded by the idle timeout instead). */
const SMALL_BODY_TIMEOUT_MS = 30_000;

/**
 * Reads a small body of at most `max` bytes. Over the limit it answers 413 (`tooLarge`) without reading
 * further (and without destroying the request, so the reply still goes out); a body that does not arrive
 * in time gets 408.
 */
export function readSmallBody(req: IncomingMessage, max: number, tooLarge: string): Promise<Buffer> {
  const raw = req.headers['content-length'];
  if (raw !== undefined && Number(raw) > max) return Promise.reject(new HttpError(413, tooLarge));
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const cleanup = (): void => {
      clearTimeout(timer);
      req.off('data', onData).off('end', onEnd).off('close', onClose).off('error', onClose);
    };
    const fail = (err: Error): void => {
      cleanup();
      req.pause();
      reject(err);
    };
    const onData = (chunk: Buffer): void => {
      size += chunk.length;
      if (size > max) fail(new HttpError(413, tooLarge));
      else chunks.push(chunk);
    };
    const onEnd = (): void => {
      cleanup();
      resolve(Buffer.concat(chunks));
    };
    const onClose = (): void => {
      if (!req.complete) fail(new Error('the client went away before sending its whole request body'));
    };
    const timer = setTimeout(
      () => fail(new HttpError(408, `request body not received within ${SMALL_BODY_TIMEOUT_MS / 1000} s`)),
      SMALL_BODY_TIMEOUT_MS,
    );
    req.on('data', onData).on('end', onEnd).on('close', onClose).on('error', onClose);
  });
}
