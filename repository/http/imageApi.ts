import type { ImageEntry, ImageStore } from '../store/imageStore';

/**
 * The image listing (`GET /v1/owners/<owner>/images`): the owner's images (files under `images/`) and
 * the provider's base images, each with format, sizes, checksum and status. Routing and authorisation
 * stay in httpApi.ts, shared with the file API; this module answers for an owner already authorised there.
 */

/** A refusal with its HTTP status, mapped by httpApi.ts. */
export class ImageApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = 'ImageApiError';
  }
}

export async function imageRequest(
  images: ImageStore | undefined,
  method: string,
  owner: string,
): Promise<{ status: number; body: { images: ImageEntry[] } }> {
  if (!images) throw new ImageApiError(503, 'the image store is not available on this repository');
  if (method !== 'GET') throw new ImageApiError(405, `${method} is not allowed on images`, { Allow: 'GET' });
  return { status: 200, body: { images: await images.list(owner) } };
}
