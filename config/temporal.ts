import { Client, Connection } from '@temporalio/client';
import { loadClientConnectConfig } from '@temporalio/envconfig';
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
