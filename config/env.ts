import { readFileSync } from 'node:fs';
import { z } from 'zod';

/**
 * Reads a configuration object from environment variables (VSP_*) and an optional JSON file named by
 * VSP_CONFIG, environment winning, and validates it with a schema. Errors name every bad setting with
 * the variable that sets it.
 */
export function loadConfig<S extends z.ZodObject>(
  schema: S,
  envNames: Record<keyof z.input<S> & string, string>,
  env: NodeJS.ProcessEnv = process.env,
  readFile: (p: string) => string = (p) => readFileSync(p, 'utf8'),
): z.output<S> {
  let fromFile: Record<string, unknown> = {};
  if (env.VSP_CONFIG) {
    try {
      fromFile = JSON.parse(readFile(env.VSP_CONFIG)) as Record<string, unknown>;
    } catch (err) {
      throw new Error(`cannot read the configuration file VSP_CONFIG=${env.VSP_CONFIG}`, { cause: err });
    }
  }
  const merged: Record<string, unknown> = { ...fromFile };
  for (const [key, name] of Object.entries(envNames)) {
    const v = env[name];
    if (v !== undefined && v !== '') merged[key] = v;
  }
  const r = schema.safeParse(merged);
  if (r.success) return r.data;
  const problems = r.error.issues.map((i) => {
    const key = String(i.path[0] ?? '');
    const name = (envNames as Record<string, string>)[key];
    return `${name ?? key}${name ? ` (${key})` : ''}: ${i.message}`;
  });
  throw new Error(`invalid configuration: ${problems.join('; ')}`);
}

/** "a,b,c" from the environment, or an array from the file. */
export const nameList = <T extends z.ZodType>(item: T) =>
  z.preprocess(
    (v) =>
      typeof v === 'string'
        ? v
            .split(',')
            .map((s) => s.trim())
            .filter(Boolean)
        : v,
    z.array(item).min(1),
  );
