import { z } from 'zod';
import { CAPABILITY_PREFIX } from './capability';
import { parseTaskSpec, TaskSpecError, type TaskSpec, type TaskSpecInput } from './taskSpec';

/**
 * The TaskLifecycle workflow's input, versioned: the task spec (owner and resultsPath already fixed by
 * whoever minted the capability) and the task's capability. Parsed once when a run starts; a run that
 * continues as new carries its state in `carried` (owned by the workflow, opaque here).
 *
 *   { "v": 1, "spec": { ... }, "capability": "vspcap_...", "carried": { ... } }
 *
 * Owners never build this: the repository's task API does, after authenticating them. Operators who start
 * a workflow with the Temporal CLI get one from `vsp task grant`.
 */
export const TASK_INPUT_VERSION = 1;

export interface TaskInput<Carried = unknown> {
  v: typeof TASK_INPUT_VERSION;
  spec: TaskSpecInput;
  capability: string;
  carried?: Carried;
}

export interface ParsedTaskInput<Carried = unknown> {
  spec: TaskSpec;
  capability: string;
  carried?: Carried;
}

const EnvelopeSchema = z
  .object({
    v: z.literal(TASK_INPUT_VERSION),
    spec: z.unknown(),
    capability: z
      .string()
      .max(16384)
      .refine((c) => c.startsWith(CAPABILITY_PREFIX), `capability must start with '${CAPABILITY_PREFIX}'`),
    carried: z.unknown().optional(),
  })
  .strict();

export function taskInput<C>(spec: TaskSpecInput, capability: string, carried?: C): TaskInput<C> {
  return carried === undefined
    ? { v: TASK_INPUT_VERSION, spec, capability }
    : { v: TASK_INPUT_VERSION, spec, capability, carried };
}

/**
 * Validates the envelope and the spec; throws TaskSpecError naming every bad field. A bare spec (the
 * input before capabilities) is refused with a message that says how to start a task now.
 */
export function parseTaskInput<C = unknown>(raw: unknown): ParsedTaskInput<C> {
  if (typeof raw === 'object' && raw !== null && !('v' in raw) && 'command' in raw)
    throw new TaskSpecError([
      'input: a bare task spec has no capability; owners submit through the repository (vsp submit), ' +
        'operators wrap the spec with `vsp task grant` (input {"v":1,"spec":...,"capability":...})',
    ]);
  const r = EnvelopeSchema.safeParse(raw);
  if (!r.success)
    throw new TaskSpecError(
      r.error.issues.map((i) => `input${i.path.length ? `.${i.path.join('.')}` : ''}: ${i.message}`),
    );
  return {
    spec: parseTaskSpec(r.data.spec),
    capability: r.data.capability,
    carried: r.data.carried as C | undefined,
  };
}
