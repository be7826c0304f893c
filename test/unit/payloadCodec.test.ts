import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { defaultPayloadConverter } from '@temporalio/common';
import {
  ENCRYPTED_ENCODING,
  EncryptionCodec,
  PAYLOAD_KEY_ENV,
  payloadCodecFromEnv,
  startCodecServer,
} from '../../config/payloadCodec';

/** Payload encryption: what Temporal stores is ciphertext bound to one key; the UI's endpoint decodes it. */
const input = { v: 1, spec: { owner: 'alice', command: 'cat secret' }, capability: 'vspcap_abc.def' };
const plain = defaultPayloadConverter.toPayload(input);

test('payloads round-trip; the stored form holds no plaintext; tampering and other keys are refused', async () => {
  const codec = new EncryptionCodec(randomBytes(32));
  const [sealed] = await codec.encode([plain]);
  expect(Buffer.from(sealed.metadata!.encoding!).toString()).toBe(ENCRYPTED_ENCODING);
  expect(Buffer.from(sealed.data!).toString('latin1')).not.toMatch(/vspcap_|cat secret/);
  const [opened] = await codec.decode([sealed]);
  expect(defaultPayloadConverter.fromPayload(opened)).toEqual(input);
  // Plain payloads (from before the key was configured) still decode.
  expect(await codec.decode([plain])).toEqual([plain]);

  const flipped = Buffer.from(sealed.data!);
  flipped[20] ^= 1;
  await expect(codec.decode([{ ...sealed, data: flipped }])).rejects.toThrow(/authenticate/);
  await expect(new EncryptionCodec(randomBytes(32)).decode([sealed])).rejects.toThrow(
    new RegExp(`encrypted with key ${codec.keyId}`),
  );
});

test('the key comes from a private file; the codec endpoint answers the UI origin only', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-codec-'));
  try {
    const file = path.join(dir, 'payload.key');
    await fs.writeFile(file, `${randomBytes(32).toString('base64url')}\n`, { mode: 0o600 });
    expect(payloadCodecFromEnv({})).toBeUndefined();
    const codec = payloadCodecFromEnv({ [PAYLOAD_KEY_ENV]: file })!;
    await fs.chmod(file, 0o644);
    expect(() => payloadCodecFromEnv({ [PAYLOAD_KEY_ENV]: file })).toThrow(/readable by others/);

    const origin = 'http://127.0.0.1:8233';
    const server = await startCodecServer(codec, { host: '127.0.0.1', port: 0, origin });
    try {
      const [sealed] = await codec.encode([plain]);
      const asJson = (p: typeof sealed) => ({
        metadata: Object.fromEntries(
          Object.entries(p.metadata!).map(([k, v]) => [k, Buffer.from(v!).toString('base64')]),
        ),
        data: Buffer.from(p.data!).toString('base64'),
      });
      const res = await fetch(`${server.url}/decode`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', 'X-Namespace': 'default' },
        body: JSON.stringify({ payloads: [asJson(sealed)] }),
      });
      expect(res.status).toBe(200);
      expect(res.headers.get('access-control-allow-origin')).toBe(origin);
      const { payloads } = (await res.json()) as { payloads: { data: string }[] };
      expect(JSON.parse(Buffer.from(payloads[0].data, 'base64').toString('utf8'))).toEqual(input);
    } finally {
      await server.close();
    }
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});
