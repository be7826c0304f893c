import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { DataConverter, Payload, PayloadCodec } from '@temporalio/common';
import { temporal } from '@temporalio/proto';

/**
 * Optional encryption of every payload VSP sends through Temporal (workflow inputs with the task spec
 * and its capability, activity arguments, results, queries, updates): AES-256-GCM with a key the
 * operators keep in a file (`VSP_PAYLOAD_KEY_FILE`, 32 bytes base64url, mode 0600). Temporal's
 * history, visibility and web UI then hold ciphertext only; the web UI shows it through `vsp codec
 * serve` (its codec endpoint). Every process that talks to Temporal for VSP (control and host workers,
 * the repository, operators' tools) needs the same key; without the variable payloads are plain.
 */

export const PAYLOAD_KEY_ENV = 'VSP_PAYLOAD_KEY_FILE';
export const ENCRYPTED_ENCODING = 'binary/encrypted';
const KEY_ID = 'encryption-key-id';
const IV_BYTES = 12;
const TAG_BYTES = 16;

const utf8 = (s: string) => new TextEncoder().encode(s);
const text = (b: Uint8Array | null | undefined) => (b ? Buffer.from(b).toString('utf8') : undefined);

export class EncryptionCodec implements PayloadCodec {
  /** Names the key in each payload, so a payload from another key is refused by name. */
  readonly keyId: string;

  constructor(private readonly key: Buffer) {
    if (key.length !== 32) throw new Error('the payload key must be 32 bytes');
    this.keyId = createHash('sha256').update(key).digest('hex').slice(0, 16);
  }

  async encode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((p) => {
      const iv = randomBytes(IV_BYTES);
      const cipher = createCipheriv('aes-256-gcm', this.key, iv);
      const plain = temporal.api.common.v1.Payload.encode(p).finish();
      const sealed = Buffer.concat([iv, cipher.update(plain), cipher.final(), cipher.getAuthTag()]);
      return { metadata: { encoding: utf8(ENCRYPTED_ENCODING), [KEY_ID]: utf8(this.keyId) }, data: sealed };
    });
  }

  async decode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((p) => {
      if (text(p.metadata?.encoding) !== ENCRYPTED_ENCODING) return p;
      const keyId = text(p.metadata?.[KEY_ID]);
      if (keyId !== this.keyId)
        throw new Error(`payload encrypted with key ${keyId ?? '(none)'}, not with this key (${this.keyId})`);
      const sealed = Buffer.from(p.data ?? []);
      const decipher = createDecipheriv('aes-256-gcm', this.key, sealed.subarray(0, IV_BYTES));
      decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
      const plain = Buffer.concat([
        decipher.update(sealed.subarray(IV_BYTES, sealed.length - TAG_BYTES)),
        decipher.final(),
      ]);
      return temporal.api.common.v1.Payload.decode(plain) as Payload;
    });
  }
}

/** The codec of `VSP_PAYLOAD_KEY_FILE`, or undefined when it is unset (payloads plain). */
export function payloadCodecFromEnv(env: NodeJS.ProcessEnv = process.env): EncryptionCodec | undefined {
  const file = env[PAYLOAD_KEY_ENV];
  if (!file) return undefined;
  try {
    // Whoever reads the key reads every task's spec and capability.
    if ((statSync(file).mode & 0o077) !== 0) throw new Error('it is readable by others: chmod 600 it');
    return new EncryptionCodec(Buffer.from(readFileSync(file, 'utf8').trim(), 'base64url'));
  } catch (err) {
    throw new Error(`${PAYLOAD_KEY_ENV}=${file}: ${(err as Error).message}`, { cause: err });
  }
}

/** The data converter for Clients and Workers: with the codec when a payload key is configured. */
export function dataConverterFromEnv(env: NodeJS.ProcessEnv = process.env): DataConverter {
  const codec = payloadCodecFromEnv(env);
  return codec ? { payloadCodecs: [codec] } : {};
}

interface JsonPayload {
  metadata?: Record<string, string>;
  data?: string;
}

const fromJson = (p: JsonPayload): Payload => ({
  metadata: Object.fromEntries(
    Object.entries(p.metadata ?? {}).map(([k, v]) => [k, Buffer.from(v, 'base64')]),
  ),
  data: Buffer.from(p.data ?? '', 'base64'),
});

const toJson = (p: Payload): JsonPayload => ({
  metadata: Object.fromEntries(
    Object.entries(p.metadata ?? {}).map(([k, v]) => [k, Buffer.from(v ?? []).toString('base64')]),
  ),
  data: Buffer.from(p.data ?? []).toString('base64'),
});

const MAX_CODEC_BODY = 16 * 1024 * 1024;

/**
 * The Temporal web UI's codec endpoint (`POST /decode`, `POST /encode`, payloads as proto JSON), for the
 * operators' UI only: it answers the one `origin` given (CORS) and should listen on loopback or the
 * operators' network, since whoever reaches it can decrypt.
 */
export async function startCodecServer(
  codec: PayloadCodec,
  opts: { host: string; port: number; origin: string },
): Promise<{ url: string; close(): Promise<void> }> {
  const cors = {
    'Access-Control-Allow-Origin': opts.origin,
    'Access-Control-Allow-Methods': 'POST, OPTIONS',
    'Access-Control-Allow-Headers': 'Content-Type, X-Namespace, Authorization',
  };
  const server = createServer((req, res) => {
    const reply = (status: number, body?: unknown) => {
      const out = body === undefined ? '' : JSON.stringify(body);
      res.writeHead(status, { ...cors, 'Content-Type': 'application/json' }).end(out);
    };
    if (req.method === 'OPTIONS') return reply(204);
    const op = req.url === '/decode' ? 'decode' : req.url === '/encode' ? 'encode' : undefined;
    if (req.method !== 'POST' || !op) return reply(404, { error: 'POST /decode or /encode' });
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > MAX_CODEC_BODY) req.destroy();
      else chunks.push(c);
    });
    req.on('end', () => {
      void (async () => {
        const { payloads } = JSON.parse(Buffer.concat(chunks).toString('utf8')) as {
          payloads: JsonPayload[];
        };
        const out = await codec[op](payloads.map(fromJson));
        reply(200, { payloads: out.map(toJson) });
      })().catch((err: unknown) => reply(400, { error: (err as Error).message }));
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://${opts.host.includes(':') ? `[${opts.host}]` : opts.host}:${port}`,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
