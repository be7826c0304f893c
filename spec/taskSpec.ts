import { z } from 'zod';
import { isValidRepoPath, normaliseRepoPath, OWNER_NAME } from './repoPath';

/**
 * The task spec: the one JSON object a user gives to start a task, so that
 * `temporal workflow start --type TaskLifecycle --task-queue vsp --input '{...}'` works as well as the
 * client library. Validated in the client and again in the workflow (this file has no Node APIs).
 */
const repoPath = (what: string) =>
  z
    .string()
    .refine(isValidRepoPath, {
      error: (iss) => {
        try {
          normaliseRepoPath(String(iss.input), what);
        } catch (err) {
          return (err as Error).message;
        }
        return `invalid ${what}`;
      },
    })
    .transform((p) => normaliseRepoPath(p, what));

/** A base image's name, as the provider gives it (`vsp image add-base`) and task specs name it (`base:<name>`). */
/** The hypervisor drivers a task may name and a host may offer. */
export const DRIVER_NAMES = ['process', 'qemu', 'xen'] as const;

export const BASE_IMAGE_NAME = /^[a-z0-9][a-z0-9._-]{0,99}$/;
export const BASE_IMAGE_PREFIX = 'base:';
/** Where every owner sees the provider's base images (read-only) in its own repository space. */
export const BASE_IMAGES_FOLDER = 'base-images';

/**
 * The repository path (in the owner's view) of a task's `image` other than 'default': a base image's
 * path in the read-only provider folder, or the owner's own path. Assumes a validated spec.
 */
export function imageRepoPath(image: string): string {
  return image.startsWith(BASE_IMAGE_PREFIX)
    ? `${BASE_IMAGES_FOLDER}/${image.slice(BASE_IMAGE_PREFIX.length)}`
    : image;
}

/** Why `image` is not a valid task image, or undefined if it is. */
function imageProblem(image: string): string | undefined {
  if (image === 'default') return undefined;
  if (image.startsWith(BASE_IMAGE_PREFIX)) {
    const name = image.slice(BASE_IMAGE_PREFIX.length);
    return BASE_IMAGE_NAME.test(name)
      ? undefined
      : `base image name ${JSON.stringify(name)} is invalid: it must match ${BASE_IMAGE_NAME}`;
  }
  try {
    const p = normaliseRepoPath(image, 'image path');
    if (p === BASE_IMAGES_FOLDER || p.startsWith(`${BASE_IMAGES_FOLDER}/`))
      return `name a base image as '${BASE_IMAGE_PREFIX}<name>', not by its path ${JSON.stringify(p)}`;
    return undefined;
  } catch (err) {
    return (err as Error).message;
  }
}

export const TaskSpecSchema = z
  .object({
    owner: z
      .string()
      .regex(OWNER_NAME, 'owner must be lower-case letters, digits, _ or -, starting with a letter'),
    /** A short label shown in listings; defaults to the workflow id. */
    name: z.string().min(1).max(100).optional(),
    /** Repository paths in the owner's space; each appears at the same relative path in the task's home. */
    inputs: z.array(repoPath('input path')).max(1000).default([]),
    /** Run by /bin/sh -c in the task's home. */
    command: z.string().min(1, 'command is empty').max(65536),
    /**
     * Base image: 'default' (the provider's appliance), 'base:<name>' (one of the provider's base
     * images, `vsp image ls`), or an image path in the owner's space (e.g. 'images/my.qcow2').
     */
    image: z
      .string()
      .min(1)
      .max(1024)
      .superRefine((image, ctx) => {
        const problem = imageProblem(image);
        if (problem !== undefined) ctx.addIssue({ code: 'custom', message: problem });
      })
      .transform((image) =>
        image === 'default' || image.startsWith(BASE_IMAGE_PREFIX) ? image : normaliseRepoPath(image),
      )
      .default('default'),
    /** Which hypervisor driver to use; the host's default when absent. */
    driver: z.enum(DRIVER_NAMES).optional(),
    vcpus: z.number().int().min(1).max(64).default(1),
    memoryMiB: z.number().int().min(64).max(262144).default(256),
    timeLimitSec: z
      .number()
      .int()
      .min(1)
      .max(30 * 24 * 3600)
      .default(3600),
    /** Folder in the task's home whose contents are the task's outputs. */
    outputDir: repoPath('outputDir').default('out'),
    /** Room left on the data disk for outputs. */
    outputRoomMiB: z
      .number()
      .int()
      .min(1)
      .max(1024 * 1024)
      .default(64),
    /** Repository folder (owner's space) that receives outputs and logs; default results/<task id>. */
    resultsPath: repoPath('resultsPath').optional(),
    /** TCP ports of a long-running service; a task with ports runs until cancelled. */
    ports: z.array(z.number().int().min(1).max(65535)).max(32).default([]),
    /**
     * What happens when the task's host dies before its outputs are staged out: 'fail' (HostDown, the
     * default) or 'restart' (placed again on another live host, from stage-in).
     */
    onHostFailure: z.enum(['fail', 'restart']).default('fail'),
    /**
     * After a live migration, the VM's disks move to its new host too, while it runs (storage
     * evacuation), ending its dependence on the host it left; unset: the cluster's default
     * (VSP_LOCALIZE_DISKS_AFTER_MIGRATION on the control worker).
     */
    localizeDisksAfterMigration: z.boolean().optional(),
    /** Host to run on; placement chooses when absent. */
    host: z
      .string()
      .regex(/^[a-z0-9][a-z0-9-]{0,62}$/, 'host must be a host name from the cluster configuration')
      .optional(),
    /** Only hosts whose configured labels include all of these (VSP_HOST_LABELS). */
    labels: z
      .record(
        z.string().regex(/^[a-z0-9][a-z0-9_.-]{0,62}$/, 'label names are lower-case letters, digits, _ . -'),
        z.string().max(253),
      )
      .refine((l) => Object.keys(l).length <= 32, 'at most 32 labels')
      .default({}),
    /** Queue order when the cluster is full: higher first, first come first served within one. */
    priority: z.number().int().min(-100).max(100).default(0),
    /**
     * When the task should be done (ISO 8601 time with its offset): while its progress (VSP-PROGRESS)
     * lags the share of the time spent, its CPU share is raised.
     */
    deadline: z.iso
      .datetime({ offset: true, error: 'deadline must be an ISO 8601 time, e.g. 2026-12-01T18:00:00Z' })
      .optional(),
  })
  .strict()
  .superRefine((spec, ctx) => {
    // A second copy of an input would only overwrite the first; a port twice is a mistake.
    for (const field of ['inputs', 'ports'] as const) {
      const seen = new Map<string | number, number>();
      spec[field].forEach((v, i) => {
        const first = seen.get(v);
        if (first !== undefined)
          ctx.addIssue({
            code: 'custom',
            path: [field, i],
            message: `duplicate of ${field}[${first}] (${JSON.stringify(v)})`,
          });
        else seen.set(v, i);
      });
    }
  });

export type TaskSpecInput = z.input<typeof TaskSpecSchema>;
export type TaskSpec = z.output<typeof TaskSpecSchema>;

export class TaskSpecError extends Error {
  constructor(readonly issues: string[]) {
    super(`invalid task spec: ${issues.join('; ')}`);
    this.name = 'TaskSpecError';
  }
}

/** Validates and fills defaults; throws TaskSpecError naming every bad field. */
export function parseTaskSpec(input: unknown): TaskSpec {
  const r = TaskSpecSchema.safeParse(input);
  if (r.success) return r.data;
  throw new TaskSpecError(r.error.issues.flatMap(issueText));
}

/** One line per bad field, `<field>: <reason>`, in words a user can act on. */
function issueText(issue: z.core.$ZodIssue): string[] {
  const field = (path: readonly PropertyKey[]) => (path.length ? path.join('.') : 'spec');
  if (issue.code === 'unrecognized_keys')
    return issue.keys.map((key) => {
      const near = issue.path.length ? undefined : nearestField(key);
      return `${field([...issue.path, key])}: unknown field${near ? ` (did you mean "${near}"?)` : ''}`;
    });
  if (issue.code === 'invalid_type' && issue.input === undefined) return [`${field(issue.path)}: required`];
  return [`${field(issue.path)}: ${issue.message}`];
}

/** The spec field a misspelt key most likely meant: at most two edits away. */
function nearestField(key: string): string | undefined {
  let best: { name: string; d: number } | undefined;
  for (const name of Object.keys(TaskSpecSchema.shape)) {
    const d = editDistance(key.toLowerCase(), name.toLowerCase());
    if (d <= 2 && (!best || d < best.d)) best = { name, d };
  }
  return best?.name;
}

/** Levenshtein distance (short strings: field names). */
function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++)
      cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = cur;
  }
  return prev[b.length];
}
