export type StoreErrorCode =
  | 'not-found'
  | 'too-large'
  | 'quota-exceeded'
  | 'checksum-mismatch'
  | 'size-mismatch'
  | 'conflict'
  | 'corrupt';

/** A refusal of the file store, whatever the backend, with a code each protocol maps to its own answer. */
export class StoreError extends Error {
  constructor(
    readonly code: StoreErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'StoreError';
  }
}
