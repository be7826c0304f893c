import v8 from 'node:v8';

/**
 * How far V8 lets the heap grow past what the last full collection kept, in percent (default: V8's
 * own factor, about 130 on a small heap).
 */
const HEAP_GROWING_PERCENT = 400;

/**
 * For processes that stream files (the repository server, host workers, the CLI): every socket read
 * is a fresh 64 KiB buffer outside the JavaScript heap, and V8 counts those bytes against the limit
 * derived from its small heap, so a 1 GiB transfer started a full collection every ~12 MB (50 to 70
 * per GiB), the largest cost of the receiving thread after the hash, and about half the transfer's
 * time. A larger growing factor leaves room for that churn (one full collection in 3 GiB measured);
 * the buffers themselves still die young. Call it once, first thing in the entrypoint.
 */
export function tuneHeapForStreaming(): void {
  v8.setFlagsFromString(`--heap-growing-percent=${HEAP_GROWING_PERCENT}`);
}
