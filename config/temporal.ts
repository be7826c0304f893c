import { Client, Connection } from '@temporalio/client';
import { loadClientConnectConfig } from '@temporalio/envconfig';
import { temporal } from '@temporalio/proto';
import { SEARCH_ATTRIBUTE_TYPES } from './names';
import { dataConverterFromEnv } from './payloadCodec';

/**
 * Temporal connection settings follow Temporal's own conventions (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE,
 * TEMPORAL_API_KEY, TEMPORAL_TLS_*, TEMPORAL_PROFILE and the temporal.toml profile file), so the same
 * binaries run against the dev server or a production cluster.
 */
export function temporalSettings(): { address: string; namespace: string; connect: ReturnType<typeof load> } {
  const cfg = load();
  return {
    address: cfg.connectionOptions.address ?? 'localhost:7233',
    namespace: cfg.namespace ?? 'default',
    connect: cfg,
  };
}

function load() {
  try {
    return loadClientConnectConfig();
  } catch (err) {
    throw new Error('invalid Temporal connection settings (TEMPORAL_* environment or profile file)', {
      cause: err,
    });
  }
}

export async function connectClient(): Promise<Client> {
  const s = temporalSettings();
  try {
    const connection = await Connection.connect({ ...s.connect.connectionOptions, address: s.address });
    return new Client({ connection, namespace: s.namespace, dataConverter: dataConverterFromEnv() });
  } catch (err) {
    throw new Error(`cannot reach Temporal at ${s.address}`, { cause: err });
  }
}

/** The one call of Temporal's operator service this needs (a client's or a worker's connection has it). */
interface SearchAttributeLister {
  listSearchAttributes(request: {
    namespace: string;
  }): Promise<{ customAttributes?: Record<string, temporal.api.enums.v1.IndexedValueType> | null }>;
}

const INDEXED_TYPE = temporal.api.enums.v1.IndexedValueType;
const indexedType = {
  Keyword: INDEXED_TYPE.INDEXED_VALUE_TYPE_KEYWORD,
  Int: INDEXED_TYPE.INDEXED_VALUE_TYPE_INT,
};

/** VSP's search attributes the namespace lacks (missing, or of another type), each with its Temporal type. */
export async function missingSearchAttributeTypes(
  operator: SearchAttributeLister,
  namespace: string,
): Promise<Record<string, temporal.api.enums.v1.IndexedValueType>> {
  const have = (await operator.listSearchAttributes({ namespace })).customAttributes ?? {};
  return Object.fromEntries(
    Object.entries(SEARCH_ATTRIBUTE_TYPES)
      .filter(([name, type]) => have[name] !== indexedType[type])
      .map(([name, type]) => [name, indexedType[type]]),
  );
}

/**
 * What the namespace lacks of VSP's search attributes, as `temporal operator search-attribute create`
 * commands that add them; empty when none is missing. A task's workflow upserts them: in a namespace
 * without them its every workflow task would fail.
 */
export async function missingSearchAttributes(
  operator: SearchAttributeLister,
  namespace: string,
): Promise<string[]> {
  return Object.keys(await missingSearchAttributeTypes(operator, namespace)).map(
    (name) =>
      `temporal operator search-attribute create --namespace ${namespace} --name ${name} --type ${SEARCH_ATTRIBUTE_TYPES[name as keyof typeof SEARCH_ATTRIBUTE_TYPES]}`,
  );
}
