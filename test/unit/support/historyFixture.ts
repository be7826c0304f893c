import path from 'node:path';
import * as proto from '@temporalio/proto';
import { patchProtobufRoot } from '@temporalio/proto/lib/patch-protobuf-root';

/**
 * A history as `temporal workflow show -o json` writes it, as the SDK's History. Like the SDK's
 * historyFromJSON, but with the protobufjs copy that @temporalio/proto's types come from: npm nests one
 * copy under @temporalio/common and another under @temporalio/proto (the top level holds grpc's older
 * major), and the SDK's helper then fails with "type must be a Type".
 */
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { fromJson } = require(
  require.resolve('protobufjs/ext/protojson', {
    paths: [path.dirname(require.resolve('@temporalio/proto/package.json'))],
  }),
) as {
  fromJson: (type: unknown, json: unknown, opts: object) => proto.temporal.api.history.v1.History | null;
};

const historyType = (patchProtobufRoot(proto) as unknown as { lookupType(n: string): unknown }).lookupType(
  'temporal.api.history.v1.History',
);

export function historyFromFixture(json: unknown): proto.temporal.api.history.v1.History {
  const history = fromJson(historyType, json, { ignoreUnknownFields: true });
  if (!history) throw new TypeError('not a workflow history');
  return history;
}
