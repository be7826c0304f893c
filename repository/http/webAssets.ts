import { createHash } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';
import path from 'node:path';

/**
 * The web page's static files (repository/http/web/: one HTML page, one JS module, one CSS file; no build
 * step). They stay plain files so they are linted, formatted and edited as what they are; tsc does not
 * copy them to dist/, so the folder is found beside this module in the sources or from dist/repository
 * back in the package. They are read once at start and served from memory.
 */

interface Asset {
  body: Buffer;
  type: string;
  etag: string;
}

export type WebAssets = ReadonlyMap<string, Asset>;

const FILES: Record<string, { file: string; type: string }> = {
  '/': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/index.html': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/app.js': { file: 'app.js', type: 'text/javascript; charset=utf-8' },
  '/app.css': { file: 'app.css', type: 'text/css; charset=utf-8' },
};

/**
 * Only this origin's own script and style; API calls to this origin; blobs for downloads. No inline
 * code, no frames, no plugins, no form posts elsewhere.
 */
export const CONTENT_SECURITY_POLICY = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data: blob:",
  "connect-src 'self'",
  "form-action 'self'",
  "base-uri 'none'",
  "frame-ancestors 'none'",
].join('; ');

/** Where the page's files are, from the sources (repository/http/) or the build (dist/repository/http/). */
export function webDir(): string {
  const candidates = [
    path.join(__dirname, 'web'),
    path.join(__dirname, '..', '..', '..', 'repository', 'http', 'web'),
  ];
  const found = candidates.find((dir) => existsSync(path.join(dir, 'index.html')));
  if (!found)
    throw new Error(`the web page's files are missing: none of ${candidates.join(', ')} has index.html`);
  return found;
}

export async function loadWebAssets(dir = webDir()): Promise<WebAssets> {
  const assets = new Map<string, Asset>();
  for (const [route, { file, type }] of Object.entries(FILES)) {
    let body: Buffer;
    try {
      body = await fs.readFile(path.join(dir, file));
    } catch (err) {
      throw new Error(`cannot read the web page's ${file} in ${dir}`, { cause: err });
    }
    const etag = `"${createHash('sha256').update(body).digest('base64url').slice(0, 27)}"`;
    assets.set(route, { body, type, etag });
  }
  return assets;
}

/** Serves the request if it names one of the page's files; false leaves it to the API. */
export function serveWebAsset(assets: WebAssets, req: IncomingMessage, res: ServerResponse): boolean {
  const target = req.url ?? '/';
  const q = target.indexOf('?');
  const asset = assets.get(q < 0 ? target : target.slice(0, q));
  if (!asset) return false;
  const headers: Record<string, string> = {
    'Content-Security-Policy': CONTENT_SECURITY_POLICY,
    'X-Content-Type-Options': 'nosniff',
    'Referrer-Policy': 'no-referrer',
    'Cross-Origin-Opener-Policy': 'same-origin',
    // File names carry no version: the browser keeps a copy but asks each time whether it still holds.
    'Cache-Control': 'no-cache',
    ETag: asset.etag,
  };
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.writeHead(405, { ...headers, Allow: 'GET, HEAD', 'Content-Type': 'text/plain; charset=utf-8' });
    res.end(`${req.method} is not allowed on the web page\n`);
    return true;
  }
  if (req.headers['if-none-match'] === asset.etag) {
    res.writeHead(304, headers).end();
    return true;
  }
  res.writeHead(200, { ...headers, 'Content-Type': asset.type, 'Content-Length': asset.body.length });
  res.end(req.method === 'HEAD' ? undefined : asset.body);
  return true;
}
