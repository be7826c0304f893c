import type { DataConverter } from '@temporalio/common';
import { NativeConnection } from '@temporalio/worker';
import { dataConverterFromEnv } from './payloadCodec';
import { temporalSettings } from './temporal';

/*
 * Apart from temporal.ts so that clients (the `vsp` package's VspClient) never load @temporalio/worker,
 * its native core bridge and webpack.
 */

/** A worker's connection, and the data converter its Worker and Client must share (payloadCodec.ts). */
export async function connectWorkerConnection(): Promise<{
  connection: NativeConnection;
  namespace: string;
  dataConverter: DataConverter;
}> {
  const s = temporalSettings();
  const dataConverter = dataConverterFromEnv();
  try {
    const connection = await NativeConnection.connect({ ...s.connect.connectionOptions, address: s.address });
    return { connection, namespace: s.namespace, dataConverter };
  } catch (err) {
    throw new Error(`cannot reach Temporal at ${s.address}`, { cause: err });
  }
}
