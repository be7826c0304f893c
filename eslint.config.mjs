import js from '@eslint/js';
import tseslint from 'typescript-eslint';
import globals from 'globals';

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', '.vsp/**', 'coverage/**', 'bench-results/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { ...globals.node, ...globals.jest } },
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
    },
  },
  {
    // Jest's configs are CommonJS, as jest loads them.
    files: ['jest*.config.js', 'test/tiers.js', 'test/sequencer.js'],
    rules: { '@typescript-eslint/no-require-imports': 'off' },
  },
  {
    // The repository's web page runs in the browser, as plain scripts (no build step).
    files: ['repository/http/web/**/*.js'],
    languageOptions: { globals: { ...globals.browser } },
  },
  {
    // Workflow code runs in Temporal's deterministic sandbox: no Node APIs, no clocks, no randomness.
    files: ['workflows/**/*.ts'],
    rules: {
      '@typescript-eslint/no-restricted-imports': [
        'error',
        {
          patterns: [
            { group: ['fs', 'node:*', 'child_process'], message: 'Workflows must stay deterministic.' },
            { group: ['../activities*', '../drivers*', '../storage*'], allowTypeImports: true },
          ],
        },
      ],
    },
  },
);
