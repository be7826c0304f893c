import { z } from 'zod';
import { CAPABILITY_PREFIX } from './capability';
import { parseTaskSpec, TaskSpecError, type TaskSpec, type TaskSpecInput } from './taskSpec';

/**
 * The TaskLifecycle workflow's input, versioned: the task spec (owner and resultsPath already fixed by
 * whoever minted the capability) and the task's capability. Parsed once when a run starts; a run that
 * continues as new carries its state in `carried` (owned by the workflow, opaque here).
 *
 *   { "v": 1, "spec": { ... }, "capability": "vspcap_...", "carried": { ... }, "tuning": { ... } }
 *
 * Owners never build this: the repository's task API does, after authenticating them. Operators who start
 * a workflow with the Temporal CLI get one from `vsp task grant`.
 */
export const TASK_INPUT_VERSION = 1;

/**
 * The workflow's durations where an operator (or a test) wants others than the defaults
 * (workflows/lifecycle/activities.ts): all optional, in seconds unless named otherwise.
 */
export const TaskTuningSchema = z
  .object({
    /** How long finished outputs wait on their host for an unavailable repository (default 7 days). */
    repositoryRetentionSec: z
      .number()
      .int()
      .min(1)
      .max(365 * 86400)
      .optional(),
    /** Between stage-out tries while the repository is unavailable (default 60). */
    repositoryRetrySec: z.number().int().min(1).max(86400).optional(),
    /** A host step nobody picks up for this long asks the control queue whether the host lives (default 10). */
    hostQueueTimeoutSec: z.number().int().min(1).max(3600).optional(),
    /** Tries of a host step before the workflow handles its failure (default 20). */
    hostStepAttempts: z.number().int().min(1).max(1000).optional(),
    /** First wait between tries of a host step, in ms (default 1000). */
    hostRetryInitialMs: z.number().int().min(10).max(60000).optional(),
    /** Continue-as-new past this many history events even if Temporal does not suggest it yet. */
    historyEventLimit: z.number().int().min(10).max(51200).optional(),
  })
  .strict();
export type TaskTuning = z.infer<typeof TaskTuningSchema>;

export interface TaskInput<Carried = unknown> {
  v: typeof TASK_INPUT_VERSION;
  spec: TaskSpecInput;
  capability: string;
  carried?: Carried;
  tuning?: TaskTuning;
}

export interface ParsedTaskInput<Carried = unknown> {
  spec: TaskSpec;
  /** The spec as given, handed on unchanged when the workflow continues as new. */
  specInput: TaskSpecInput;
  capability: string;
  carried?: Carried;
  tuning: TaskTuning;
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
    tuning: TaskTuningSchema.optional(),
  })
  .strict();

export function taskInput<C>(
  spec: TaskSpecInput,
  capability: string,
  carried?: C,
  tuning?: TaskTuning,
): TaskInput<C> {
  const input: TaskInput<C> = { v: TASK_INPUT_VERSION, spec, capability };
  if (carried !== undefined) input.carried = carried;
  if (tuning !== undefined) input.tuning = tuning;
  return input;
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
    specInput: r.data.spec as TaskSpecInput,
    capability: r.data.capability,
    carried: r.data.carried as C | undefined,
    tuning: r.data.tuning ?? {},
  };
}
