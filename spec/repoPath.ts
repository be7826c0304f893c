/**
 * Repository paths, shared by the repository server, the client library and the task spec (and so
 * by workflow code: keep this file free of Node APIs). A path is relative, '/'-separated, normalised,
 * with no '.', '..' or empty segments, no NUL or control characters, and bounded lengths.
 */
export const MAX_PATH_BYTES = 1024;
export const MAX_SEGMENT_BYTES = 255;

function utf8Length(s: string): number {
  return new TextEncoder().encode(s).length;
}

/** Returns the normalised path, or throws an Error naming what is wrong. */
export function normaliseRepoPath(input: string, what = 'path'): string {
  if (typeof input !== 'string' || input.length === 0) throw new Error(`${what} is empty`);
  if (input.includes('\0')) throw new Error(`${what} contains a NUL byte`);
  // What lenient decoders (SSH libraries, browsers) put for bytes that are not UTF-8: refused so that
  // different invalid names can never meet in one file.
  if (input.includes('\uFFFD'))
    throw new Error(`${what} contains U+FFFD, the mark of bytes that were not UTF-8: names must be UTF-8`);
  // eslint-disable-next-line no-control-regex
  if (/[\x01-\x1f\x7f]/.test(input)) throw new Error(`${what} contains a control character`);
  if (input.startsWith('/'))
    throw new Error(`${what} ${JSON.stringify(input)} is absolute; use a relative path`);
  if (input.includes('\\')) throw new Error(`${what} ${JSON.stringify(input)} contains a backslash`);
  const nfc = input.normalize('NFC');
  const segments = nfc.split('/').filter((s, i, all) => !(s === '' && i === all.length - 1));
  for (const seg of segments) {
    if (seg === '') throw new Error(`${what} ${JSON.stringify(input)} has an empty segment`);
    if (seg === '.' || seg === '..') throw new Error(`${what} ${JSON.stringify(input)} contains '${seg}'`);
    if (utf8Length(seg) > MAX_SEGMENT_BYTES)
      throw new Error(`${what} has a segment longer than ${MAX_SEGMENT_BYTES} bytes`);
  }
  const out = segments.join('/');
  if (out.length === 0) throw new Error(`${what} is empty`);
  if (utf8Length(out) > MAX_PATH_BYTES) throw new Error(`${what} is longer than ${MAX_PATH_BYTES} bytes`);
  return out;
}

/**
 * A path that must name a file. A trailing '/' spells a folder: it is refused, never dropped, so that
 * `PUT a/` cannot write the file `a` (on every protocol alike).
 */
export function normaliseFilePath(input: string, what = 'path'): string {
  refuseFolderSpelling(input, what);
  return normaliseRepoPath(input, what);
}

/** Throws if `input` ends with '/' (see normaliseFilePath); for protocols that resolve paths themselves. */
export function refuseFolderSpelling(input: string, what = 'path'): void {
  if (typeof input === 'string' && input.endsWith('/'))
    throw new Error(`${what} ${JSON.stringify(input)} ends with '/', which names a folder, not a file`);
}

export function isValidRepoPath(input: string): boolean {
  try {
    normaliseRepoPath(input);
    return true;
  } catch {
    return false;
  }
}

/** Owner names double as folder names and search-attribute values. */
export const OWNER_NAME = /^[a-z][a-z0-9_-]{0,62}$/;
