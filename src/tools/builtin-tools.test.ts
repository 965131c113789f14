import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { skipUnlessPresent } from '../../test/support/required-in-ci.js';
import { createBwrapDriver } from '../sandbox/bwrap/bwrap-driver.js';
import type { SandboxHandle } from '../sandbox/driver.js';
import {
  type BuiltinToolExecutor,
  builtinToolDefinitions,
  createBuiltinToolExecutor,
} from './builtin-tools.js';

const availability = await createBwrapDriver().checkAvailability();
const unavailableNote = availability.ok ? '' : ` (skipped: ${availability.reason})`;
const driverMissing = skipUnlessPresent(
  'the bwrap sandbox driver',
  availability.ok ? undefined : availability.reason,
);

describe.skipIf(driverMissing)(`built-in tools in a bwrap sandbox${unavailableNote}`, () => {
  const driver = createBwrapDriver();
  let workdir: string;
  let tools: BuiltinToolExecutor;
  let provisions = 0;

  beforeAll(() => {
    workdir = mkdtempSync(join(tmpdir(), 'berth-tools-'));
    let handle: Promise<SandboxHandle> | undefined;
    tools = createBuiltinToolExecutor(driver, {
      get: () => {
        if (!handle) {
          provisions += 1;
          handle = driver.provision({ sessionId: 'sesn_tools', workdir });
        }
        return handle;
      },
    });
  });

  afterAll(async () => {
    await driver.destroyAll();
    rmSync(workdir, { recursive: true, force: true });
  });

  it('describes six tools with JSON schemas; read, glob and grep are read-only', () => {
    expect(builtinToolDefinitions.map((tool) => tool.name)).toEqual([
      'bash',
      'read',
      'write',
      'edit',
      'glob',
      'grep',
    ]);
    expect(builtinToolDefinitions.filter((tool) => tool.readOnly).map((tool) => tool.name)).toEqual([
      'read',
      'glob',
      'grep',
    ]);
    const edit = builtinToolDefinitions.find((tool) => tool.name === 'edit')!;
    expect(edit.inputSchema).toMatchObject({
      type: 'object',
      required: ['file_path', 'old_string', 'new_string'],
    });
    expect(Object.keys(edit.inputSchema.properties ?? {})).toEqual([
      'file_path',
      'old_string',
      'new_string',
      'replace_all',
    ]);
  });

  it('runs bash in /workspace with stdout and stderr together and reports a failing exit code', async () => {
    const result = await tools.execute('bash', { command: 'pwd; echo oops >&2; exit 4' });
    expect(result.isError).toBe(false);
    expect(result.content).toBe('/workspace\noops\n\n[exit code: 4]');
    expect(provisions).toBe(1);
  });

  it('kills a bash command at its timeout and returns an error', async () => {
    const started = Date.now();
    const result = await tools.execute('bash', { command: 'echo started; sleep 30', timeout_ms: 300 });
    expect(Date.now() - started).toBeLessThan(5000);
    expect(result.isError).toBe(true);
    expect(result.content).toContain('started');
    expect(result.content).toContain('timed out after 300 ms');
  });

  it('caps a huge bash output and says it was truncated', async () => {
    const result = await tools.execute('bash', { command: 'head -c 5000000 /dev/zero | tr "\\0" x' });
    expect(result.content.length).toBeLessThan(101_000);
    expect(result.content).toContain('[output truncated');
  });

  it('writes a file, reads it back numbered, and reads a line range', async () => {
    const written = await tools.execute('write', {
      file_path: 'notes/todo.txt',
      content: 'one\ntwo\nthree\n',
    });
    expect(written).toEqual({ content: 'Wrote 14 bytes to notes/todo.txt', isError: false });
    const whole = await tools.execute('read', { file_path: '/workspace/notes/todo.txt' });
    expect(whole.content).toBe('     1\tone\n     2\ttwo\n     3\tthree');
    const part = await tools.execute('read', { file_path: 'notes/todo.txt', view_range: [2, 3] });
    expect(part.content).toBe('     2\ttwo\n     3\tthree');
    const pastEnd = await tools.execute('read', { file_path: 'notes/todo.txt', view_range: [9, -1] });
    expect(pastEnd.isError).toBe(true);
  });

  it('edits one occurrence, refuses ambiguous or missing text, and replaces all when asked', async () => {
    await tools.execute('write', { file_path: 'edit.txt', content: 'alpha beta alpha\ngamma\n' });
    const missing = await tools.execute('edit', {
      file_path: 'edit.txt',
      old_string: 'delta',
      new_string: 'x',
    });
    expect(missing).toMatchObject({ isError: true, content: expect.stringContaining('not found') });
    const ambiguous = await tools.execute('edit', {
      file_path: 'edit.txt',
      old_string: 'alpha',
      new_string: 'x',
    });
    expect(ambiguous).toMatchObject({ isError: true, content: expect.stringContaining('occurs 2 times') });
    const single = await tools.execute('edit', {
      file_path: 'edit.txt',
      old_string: 'gamma',
      new_string: '$&!',
    });
    expect(single.isError).toBe(false);
    const all = await tools.execute('edit', {
      file_path: 'edit.txt',
      old_string: 'alpha',
      new_string: 'omega',
      replace_all: true,
    });
    expect(all.content).toBe('Replaced 2 occurrences in edit.txt');
    expect((await tools.execute('bash', { command: 'cat edit.txt' })).content).toBe(
      'omega beta omega\n$&!\n',
    );
  });

  it('finds files with glob, including ** patterns and a base path', async () => {
    await tools.execute('bash', {
      command: 'mkdir -p src/a/b && touch src/x.ts src/a/y.ts src/a/b/z.ts src/a/w.js',
    });
    const all = await tools.execute('glob', { pattern: '**/*.ts' });
    expect(all.content.split('\n')).toEqual(['src/a/b/z.ts', 'src/a/y.ts', 'src/x.ts']);
    const under = await tools.execute('glob', { pattern: '*.js', path: 'src/a' });
    expect(under.content).toBe('w.js');
    const none = await tools.execute('glob', { pattern: '*.nothing' });
    expect(none.content).toBe('No files matched.');
    const injected = await tools.execute('glob', { pattern: '$(touch pwned)*' });
    expect(injected.content).toBe('No files matched.');
    expect((await tools.execute('bash', { command: 'ls pwned' })).content).toContain('No such file');
  });

  it('searches file contents with grep and says when nothing matches', async () => {
    await tools.execute('write', { file_path: 'search/one.txt', content: 'needle here\nhay\n' });
    await tools.execute('write', { file_path: 'search/two.txt', content: 'hay\nanother needle\n' });
    const found = await tools.execute('grep', { pattern: 'need+le', path: 'search' });
    expect(found.content.split('\n').sort()).toEqual([
      'search/one.txt:1:needle here',
      'search/two.txt:2:another needle',
    ]);
    expect((await tools.execute('grep', { pattern: 'absent-string' })).content).toBe('No matches found.');
    expect((await tools.execute('grep', { pattern: '(' })).isError).toBe(true);
  });

  it('turns bad input and unknown tools into error results', async () => {
    expect(await tools.execute('read', { path: 'x' })).toMatchObject({
      isError: true,
      content: expect.stringContaining('file_path'),
    });
    expect((await tools.execute('bash', {})).isError).toBe(true);
    expect((await tools.execute('edit', 'not an object')).isError).toBe(true);
    expect(await tools.execute('teleport', {})).toMatchObject({
      isError: true,
      content: expect.stringContaining('Unknown tool'),
    });
    const missing = await tools.execute('read', { file_path: 'no/such/file.txt' });
    expect(missing).toMatchObject({ isError: true, content: expect.stringContaining('not found') });
  });

  it('works only inside the sandbox: host paths and symlinks to them are out of reach', async () => {
    const hostSecret = join(tmpdir(), `berth-tools-secret-${process.pid}.txt`);
    writeFileSync(hostSecret, 'host only\n');
    try {
      await tools.execute('bash', { command: `ln -sf ${hostSecret} leak` });
      const read = await tools.execute('read', { file_path: 'leak' });
      expect(read.isError).toBe(true);
      expect(read.content).not.toContain('host only');
      const direct = await tools.execute('read', { file_path: '/etc/shadow' });
      expect(direct.isError).toBe(true);
    } finally {
      rmSync(hostSecret, { force: true });
    }
  });
});
