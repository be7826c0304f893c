import type { FileRow, MetadataDb, OwnerRow } from './metadataDb';

/**
 * The repository's metadata behind one asynchronous interface, so that one process (`local`: SQLite in
 * the data dir, metadataDb.ts) and many stateless servers (`cluster`: PostgreSQL, pgMetadata.ts) run
 * the same FileStore, accounts, uploads and admission code. The operations are MetadataDb's, each
 * answering a promise; what differs per backend is only where the rows live.
 */

/** A file's row with where its bytes are: the object key on `cluster`, absent on `local` (bytes at the path). */
export type StoredFile = FileRow & { blob?: string };

/** The synchronous operations of MetadataDb that every backend provides. */
export type MetadataOps = Omit<
  {
    [K in keyof MetadataDb as MetadataDb[K] extends (...args: never[]) => unknown ? K : never]: MetadataDb[K];
  },
  'close' | 'transaction' | 'begin' | 'commit' | 'rollback'
>;

type Promisified<T> = {
  [K in keyof T]: T[K] extends (...args: infer A) => infer R ? (...args: A) => Promise<Awaited<R>> : never;
};

export type MetadataBackendKind = 'local' | 'cluster';

export type MetadataStore = Promisified<MetadataOps> & {
  readonly kind: MetadataBackendKind;
  /**
   * Runs `fn` in one transaction on `tx` (use only `tx` inside it): all its writes or none. On `cluster`,
   * `tx.lockOwner` holds the owner's row until the end, which is what makes quotas hold across servers.
   */
  transaction<T>(fn: (tx: MetadataStore) => Promise<T>): Promise<T>;
  close(): Promise<void>;
};

/** The owner, locked against other transactions that lock it until this one ends (a quota's commit). */
export type LockOwner = (name: string) => Promise<OwnerRow | undefined>;

/**
 * `local`: the SQLite database wrapped. SQLite has one writer and better-sqlite3 runs synchronously, so a
 * transaction is BEGIN IMMEDIATE ... COMMIT on the one connection, and calls from outside it wait until it
 * ends (an await inside the transaction could otherwise let another request's write slip into it).
 */
export function localMetadata(db: MetadataDb): MetadataStore {
  let current: Promise<void> | undefined;
  const view = (gated: boolean): MetadataStore =>
    new Proxy({} as MetadataStore, {
      get(_target, prop) {
        if (prop === 'kind') return 'local';
        if (prop === 'then') return undefined; // not a thenable: `await store` must not call into it
        if (prop === 'close') return async () => db.close();
        if (prop === 'transaction')
          return gated
            ? async <T>(fn: (tx: MetadataStore) => Promise<T>): Promise<T> => {
                while (current) await current;
                let release!: () => void;
                current = new Promise<void>((r) => (release = r));
                try {
                  db.begin();
                  try {
                    const out = await fn(direct);
                    db.commit();
                    return out;
                  } catch (err) {
                    db.rollback();
                    throw err;
                  }
                } finally {
                  current = undefined;
                  release();
                }
              }
            : <T>(fn: (tx: MetadataStore) => Promise<T>) => fn(direct);
        const op = (db as unknown as Record<string | symbol, unknown>)[prop];
        if (typeof op !== 'function') return undefined;
        return async (...args: unknown[]) => {
          if (gated) while (current) await current;
          return (op as (...a: unknown[]) => unknown).apply(db, args);
        };
      },
    });
  const direct = view(false);
  return view(true);
}
