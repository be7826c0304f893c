import { temporal } from '@temporalio/proto';
import { missingSearchAttributes } from '../../config/temporal';

const T = temporal.api.enums.v1.IndexedValueType;

function lister(customAttributes: Record<string, temporal.api.enums.v1.IndexedValueType>) {
  return {
    listSearchAttributes: jest.fn(async () =>
      temporal.api.operatorservice.v1.ListSearchAttributesResponse.create({ customAttributes }),
    ),
  };
}

test("a namespace without VSP's search attributes is named with the commands that create them", async () => {
  const complete = {
    VspOwner: T.INDEXED_VALUE_TYPE_KEYWORD,
    VspHost: T.INDEXED_VALUE_TYPE_KEYWORD,
    VspStorageHost: T.INDEXED_VALUE_TYPE_KEYWORD,
    VspPhase: T.INDEXED_VALUE_TYPE_KEYWORD,
    VspDriver: T.INDEXED_VALUE_TYPE_KEYWORD,
    VspProgress: T.INDEXED_VALUE_TYPE_INT,
  };
  expect(await missingSearchAttributes(lister(complete), 'prod')).toEqual([]);
  const { VspProgress: _gone, ...withoutProgress } = complete;
  expect(await missingSearchAttributes(lister(withoutProgress), 'prod')).toEqual([
    'temporal operator search-attribute create --namespace prod --name VspProgress --type Int',
  ]);
  // Of another type: the workflow's upsert would fail as well.
  expect(
    await missingSearchAttributes(lister({ ...complete, VspHost: T.INDEXED_VALUE_TYPE_TEXT }), 'prod'),
  ).toEqual(['temporal operator search-attribute create --namespace prod --name VspHost --type Keyword']);
});
