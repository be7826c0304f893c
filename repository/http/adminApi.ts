import type { Readable } from 'node:stream';
import { z } from 'zod';
import { AccountAdmin } from '../accounts/admin';
import { RefusedRequest } from '../refusedRequest';
import { authenticateAdmin } from '../accounts/auth';
import { listBaseImages, type ImageStore } from '../store/imageStore';
import type { MetadataStore } from '../store/metadataStore';

/**
 * The admin HTTP API (`/v1/admin/...`): the `vsp owner|token|key|password` commands and the provider's
 * base images, for a caller holding an admin token (`vsp admin token create`, on the repository host;
 * admin tokens cannot be made through this API, so a leaked one cannot mint more). Each route calls the
 * same AccountAdmin method as the CLI. Routing of `/v1/admin/` and error replies stay in httpApi.ts.
 *
 *   GET    /v1/admin/owners                      PATCH  /v1/admin/owners/<name>  {disabled?, quota?}
 *   POST   /v1/admin/owners  {name}              PUT|DELETE /v1/admin/owners/<name>/password  {password}
 *   GET    /v1/admin/tokens[?owner=]             POST   /v1/admin/tokens  {owner | service: true, name}
 *   DELETE /v1/admin/tokens/<id>                 GET    /v1/admin/keys[?owner=]
 *   POST   /v1/admin/owners/<name>/keys  {publicKey, name?}   DELETE /v1/admin/owners/<name>/keys/<id>
 *   GET    /v1/admin/base-images                 PUT|DELETE /v1/admin/base-images/<name>  (PUT: the bytes)
 */

export interface AdminApiDeps {
  db: MetadataStore;
  images?: ImageStore;
  maxFileBytes: number;
}

export interface AdminCall {
  method: string;
  /** The path after `/v1/admin/`, still percent-encoded. */
  path: string;
  query: URLSearchParams;
  token: string | undefined;
  /** Runs the token check under the protocol's login throttle (failed checks count against the caller). */
  guard<T>(login: () => T): Promise<T>;
  /** Reads the request's JSON body. */
  json(): Promise<unknown>;
  /** The request's raw body (base image uploads). */
  body(): Readable;
  /** Filled in for the audit log: who (admin:<token id>), what, on which owner or object. */
  audit: { action: string; user?: string; owner?: string; path?: string };
}

export interface AdminReply {
  status: number;
  body?: unknown;
}

/** A refusal with its HTTP status, mapped by httpApi.ts. */
export class AdminApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'AdminApiError';
  }
}

const STATUS = { invalid: 400, 'not-found': 404, conflict: 409 } as const;

const NewOwner = z.object({ name: z.string() }).strict();
const Limit = z.number().int().min(0).nullable().optional();
const OwnerChange = z
  .object({
    disabled: z.boolean().optional(),
    quota: z.object({ bytes: Limit, files: Limit }).strict().optional(),
  })
  .strict();
const Password = z.object({ password: z.string() }).strict();
const NewToken = z.union([
  z.object({ owner: z.string(), name: z.string() }).strict(),
  z.object({ service: z.literal(true), name: z.string() }).strict(),
]);
const NewKey = z.object({ publicKey: z.string(), name: z.string().optional() }).strict();

function parse<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  const issues = r.error.issues.map((i) => `${i.path.length ? i.path.join('.') : 'body'}: ${i.message}`);
  throw new AdminApiError(400, `invalid ${what}: ${issues.join('; ')}`);
}

function decode(raw: string, what: string): string {
  try {
    return decodeURIComponent(raw);
  } catch {
    throw new AdminApiError(400, `${what} is not valid percent-encoding`);
  }
}

function parseId(raw: string, what: string): number {
  if (!/^\d{1,15}$/.test(raw))
    throw new AdminApiError(400, `${what} ${JSON.stringify(raw)} must be a whole number`);
  return Number(raw);
}

function notAllowed(method: string, what: string, allow: string): never {
  throw new AdminApiError(405, `${method} is not allowed on ${what} (allowed: ${allow})`);
}

/** Answers one admin request; throws AdminApiError, AccessDenied (401/403) or StoreError. */
export async function adminRequest(deps: AdminApiDeps, call: AdminCall): Promise<AdminReply> {
  const { method, audit } = call;
  audit.action = `admin-${method.toLowerCase()}`;
  audit.path = `admin/${call.path}`;
  const principal = await call.guard(() => authenticateAdmin(deps.db, call.token));
  audit.user = `admin:${principal.tokenId}`;
  const admin = new AccountAdmin(deps.db);
  const seg = call.path.split('/').map((s) => decode(s, 'path segment'));
  try {
    return await dispatch(deps, call, admin, seg);
  } catch (err) {
    if (err instanceof RefusedRequest) throw new AdminApiError(STATUS[err.code], err.message, { cause: err });
    throw err;
  }
}

async function dispatch(
  deps: AdminApiDeps,
  call: AdminCall,
  admin: AccountAdmin,
  seg: string[],
): Promise<AdminReply> {
  const { method, audit } = call;
  const act = (action: string, owner?: string): void => {
    audit.action = `admin-${action}`;
    if (owner !== undefined) audit.owner = owner;
  };
  const ownerFilter = call.query.get('owner') ?? undefined;
  switch (seg[0]) {
    case 'owners': {
      if (seg.length === 1) {
        if (method === 'GET') {
          act('owner-list');
          return { status: 200, body: { owners: await admin.listOwners() } };
        }
        if (method !== 'POST') notAllowed(method, 'owners', 'GET, POST');
        const { name } = parse(NewOwner, await call.json(), 'new owner');
        act('owner-add', name);
        return { status: 201, body: await admin.addOwner(name) };
      }
      const owner = seg[1];
      act('owner', owner);
      if (seg.length === 2) {
        if (method !== 'PATCH') notAllowed(method, 'an owner', 'PATCH');
        const change = parse(OwnerChange, await call.json(), 'owner change');
        act(
          change.disabled === undefined ? 'owner-quota' : change.disabled ? 'owner-disable' : 'owner-enable',
        );
        await deps.db.transaction(async (tx) => {
          const inTx = new AccountAdmin(tx);
          if (change.disabled !== undefined) await inTx.setOwnerDisabled(owner, change.disabled);
          if (change.quota)
            await inTx.setQuota(owner, {
              bytes: change.quota.bytes ?? undefined,
              files: change.quota.files ?? undefined,
            });
        });
        const row = (await admin.listOwners()).find((o) => o.name === owner);
        if (!row) throw new AdminApiError(404, `no such owner: ${owner}`);
        return { status: 200, body: row };
      }
      if (seg.length === 3 && seg[2] === 'password') {
        if (method === 'PUT') {
          act('password-set');
          await admin.setPassword(owner, parse(Password, await call.json(), 'password').password);
        } else if (method === 'DELETE') {
          act('password-clear');
          await admin.clearPassword(owner);
        } else notAllowed(method, 'a password', 'PUT, DELETE');
        return { status: 204 };
      }
      if (seg[2] === 'keys' && seg.length <= 4) {
        if (seg.length === 3) {
          if (method !== 'POST') notAllowed(method, "an owner's keys", 'POST');
          act('key-add');
          const k = parse(NewKey, await call.json(), 'new key');
          return { status: 201, body: await admin.addKey(owner, k.publicKey, k.name) };
        }
        if (method !== 'DELETE') notAllowed(method, 'a key', 'DELETE');
        act('key-remove');
        await admin.removeKey(owner, parseId(seg[3], 'key id'));
        return { status: 204 };
      }
      break;
    }
    case 'tokens': {
      if (seg.length === 1) {
        if (method === 'GET') {
          act('token-list', ownerFilter);
          return { status: 200, body: { tokens: await admin.listTokens(ownerFilter) } };
        }
        if (method !== 'POST') notAllowed(method, 'tokens', 'GET, POST');
        const t = parse(NewToken, await call.json(), 'new token');
        if ('service' in t) {
          act('token-create-service');
          return { status: 201, body: await admin.createServiceToken(t.name) };
        }
        act('token-create', t.owner);
        return { status: 201, body: { owner: t.owner, ...(await admin.createToken(t.owner, t.name)) } };
      }
      if (seg.length === 2) {
        if (method !== 'DELETE') notAllowed(method, 'a token', 'DELETE');
        act('token-revoke');
        await admin.revokeToken(parseId(seg[1], 'token id'));
        return { status: 204 };
      }
      break;
    }
    case 'keys':
      if (seg.length === 1) {
        if (method !== 'GET') notAllowed(method, 'keys', 'GET');
        act('key-list', ownerFilter);
        return { status: 200, body: { keys: await admin.listKeys(ownerFilter) } };
      }
      break;
    case 'base-images': {
      const images = deps.images;
      if (!images) throw new AdminApiError(503, 'the image store is not available on this repository');
      if (seg.length === 1) {
        if (method !== 'GET') notAllowed(method, 'base images', 'GET');
        act('base-image-list');
        return { status: 200, body: { images: await listBaseImages(deps.db) } };
      }
      if (seg.length === 2) {
        if (method === 'PUT') {
          act('base-image-add');
          return { status: 201, body: await images.addBase(seg[1], call.body(), deps.maxFileBytes) };
        }
        if (method !== 'DELETE') notAllowed(method, 'a base image', 'PUT, DELETE');
        act('base-image-remove');
        await images.removeBase(seg[1]);
        return { status: 204 };
      }
      break;
    }
  }
  throw new AdminApiError(404, `no such admin endpoint: ${method} /v1/admin/${call.path}`);
}
