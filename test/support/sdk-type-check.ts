import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

/**
 * How an SDK method answers: a value (`APIPromise<T>`), a page (`PagePromise<Page, Item>`,
 * checked as the page's JSON body) or a stream (`APIPromise<Stream<T>>`, checked per item).
 */
export type AnswerKind = 'value' | 'page' | 'stream';

/** One answer Berth gave to an official SDK method, e.g. `agents.versions.list`. */
export interface RecordedAnswer {
  method: string;
  kind: AnswerKind;
  value: unknown;
}

/** True for an event Berth adds under its own `berth.` prefix (DESIGN.md §2). */
const isBerthEvent = (value: unknown) =>
  typeof value === 'object' &&
  value !== null &&
  String((value as { type?: unknown }).type).startsWith('berth.');

/**
 * Removes Berth's documented additions to the official shapes, which the SDK's types do not
 * declare: `berth` fields (`config.berth`, `usage.berth`), `berth.*` events, a session's
 * `stop_reason` and a terminated event's `reason`. Everything else must be exactly what the SDK
 * declares.
 */
function withoutBerthExtensions(value: unknown, isSession = false): unknown {
  if (Array.isArray(value))
    return value.filter((item) => !isBerthEvent(item)).map((item) => withoutBerthExtensions(item, isSession));
  if (typeof value !== 'object' || value === null) return value;
  const type = (value as { type?: unknown }).type;
  const entries = Object.entries(value).filter(
    ([key]) =>
      key !== 'berth' &&
      !(isSession && key === 'stop_reason' && 'status' in value) &&
      !(type === 'session.status_terminated' && key === 'reason'),
  );
  return Object.fromEntries(entries.map(([key, item]) => [key, withoutBerthExtensions(item, false)]));
}

/** The answers with Berth's extensions removed (a streamed `berth.*` event is dropped whole). */
function comparable(answers: readonly RecordedAnswer[]): RecordedAnswer[] {
  return answers
    .filter((answer) => !(answer.kind === 'stream' && isBerthEvent(answer.value)))
    .map((answer) => {
      const session = /^sessions\.[a-z]+$/.test(answer.method);
      const value =
        answer.kind === 'page' && session
          ? {
              ...(answer.value as object),
              data: (answer.value as { data: unknown[] }).data.map((item) =>
                withoutBerthExtensions(item, true),
              ),
            }
          : withoutBerthExtensions(answer.value, session);
      return { ...answer, value };
    });
}

const repositoryRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/**
 * The type an answer must have, read off the SDK method's own signature
 * (`Anthropic['beta']['agents']['create']`), so the check follows the installed SDK version.
 */
function declaredType(answer: RecordedAnswer): string {
  const method = answer.method
    .split('.')
    .map((part) => `[${JSON.stringify(part)}]`)
    .join('');
  const wrapper = { value: 'Answer', page: 'PageBody', stream: 'StreamItem' }[answer.kind];
  return `${wrapper}<Beta${method}>`;
}

let previousProgram: ts.Program | undefined;
/** The SDK's and the standard library's parsed declarations, shared by every check in a process. */
const parsedDeclarations = new Map<string, ts.SourceFile>();

const preamble = `import type Anthropic from '@anthropic-ai/sdk';
type Beta = Anthropic['beta'];
type Resolved<F> = F extends (...args: never[]) => PromiseLike<infer R> ? R : never;
type Answer<F> = Resolved<F>;
/** The JSON body of a page: the page class's data fields (data, next_page, ...), no methods. */
type PageBody<F> = {
  [K in keyof Resolved<F> as Resolved<F>[K] extends (...args: never[]) => unknown ? never : K]: Resolved<F>[K];
};
type StreamItem<F> = Resolved<F> extends AsyncIterable<infer Item> ? Item : never;
`;

/**
 * The generated module: one `const r_<n>_<method>: <declared type> = <JSON>;` per answer, and
 * the first line of each (0-based) to name the answer a diagnostic is about.
 */
export function answersModule(answers: readonly RecordedAnswer[]): { source: string; starts: number[] } {
  const lines = preamble.split('\n');
  const starts: number[] = [];
  answers.forEach((answer, index) => {
    const name = `r_${index}_${answer.method.replaceAll('.', '_')}${answer.kind === 'stream' ? '_item' : ''}`;
    starts.push(lines.length);
    const declaration = `export const ${name}: ${declaredType(answer)} = ${JSON.stringify(answer.value, null, 2)};`;
    lines.push(...declaration.split('\n'));
  });
  return { source: lines.join('\n'), starts };
}

/**
 * Compiles the answers against the installed `@anthropic-ai/sdk` declaration files with strict
 * settings. Object literals get TypeScript's excess property checks and literal (enum) checks, so
 * a missing required field, a wrong type, an unknown enum value and an unknown field all fail.
 * Returns the formatted diagnostics ('' when every answer conforms) and, when there are any, where
 * the generated file was written for inspection.
 */
export function checkAnswers(recorded: readonly RecordedAnswer[]): { diagnostics: string; file: string } {
  const answers = comparable(recorded);
  const { source, starts } = answersModule(answers);
  // Inside the repository, so '@anthropic-ai/sdk' resolves from its node_modules; served from
  // memory, and written to a temp directory only for a human to read.
  const virtualPath = join(repositoryRoot, 'test', '__sdk-answers.generated.ts');
  const options: ts.CompilerOptions = {
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    lib: ['lib.es2023.d.ts', 'lib.dom.d.ts'],
    types: [],
    strict: true,
    exactOptionalPropertyTypes: true,
    noUncheckedIndexedAccess: true,
    skipLibCheck: true,
    noEmit: true,
  };
  const host = ts.createCompilerHost(options);
  const readFile = host.readFile.bind(host);
  const fileExists = host.fileExists.bind(host);
  const getSourceFile = host.getSourceFile.bind(host);
  host.readFile = (path) => (path === virtualPath ? source : readFile(path));
  host.fileExists = (path) => path === virtualPath || fileExists(path);
  host.getSourceFile = (path, language, onError, shouldCreate) => {
    if (path === virtualPath) return ts.createSourceFile(path, source, language);
    let parsed = parsedDeclarations.get(path);
    if (!parsed) {
      parsed = getSourceFile(path, language, onError, shouldCreate);
      if (parsed) parsedDeclarations.set(path, parsed);
    }
    return parsed;
  };
  // The SDK's and the standard library's declarations are parsed once per process.
  const program = ts.createProgram([virtualPath], options, host, previousProgram);
  previousProgram = program;
  const diagnostics = ts.getPreEmitDiagnostics(program);
  // Written out only when something is wrong, for a human to read next to the diagnostics.
  const file =
    diagnostics.length === 0 ? '' : join(mkdtempSync(join(tmpdir(), 'berth-sdk-answers-')), 'answers.ts');
  if (file) writeFileSync(file, source);
  const text = diagnostics.map((diagnostic) => {
    const message = ts.flattenDiagnosticMessageText(diagnostic.messageText, '\n  ');
    if (diagnostic.file?.fileName !== virtualPath || diagnostic.start === undefined) return message;
    const { line } = diagnostic.file.getLineAndCharacterOfPosition(diagnostic.start);
    const index = starts.findLastIndex((start) => start <= line);
    const answer = answers[index];
    const where = answer ? `${answer.method} (answer ${index}, ${file}:${line + 1})` : `${file}:${line + 1}`;
    return `${where}: ${message}`;
  });
  return { diagnostics: text.join('\n'), file };
}
