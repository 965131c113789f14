import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { type Document, isMap, isScalar, isSeq, LineCounter, type Node, parseDocument } from 'yaml';
import { type AgentCreate, agentCreate, builtinToolNames, modelId } from '../api/schemas.js';

/**
 * Agents as files: a folder holding `AGENTS.md` (YAML front matter with the agent's settings,
 * Markdown body as the system prompt) and optional `skills/<name>/SKILL.md` files in the Agent
 * Skills format. `loadAgentFolder` turns such a folder into agent create params, or into every
 * problem it found, each pointing at a file and line a person can open.
 */

/** One thing wrong with an agent folder. `file` is relative to the folder, with `/` separators. */
export interface Problem {
  file: string;
  /** 1-based line in `file` (of the front matter key when known); absent when the file is missing. */
  line?: number;
  message: string;
}

/** A skill found under `skills/`, as listed in the system prompt. */
export interface SkillSummary {
  name: string;
  description: string;
  /** The skill's SKILL.md, relative to the agent folder. */
  file: string;
}

/**
 * What `loadAgentFolder` returns: the params and skills with warnings (things that load but
 * are probably mistakes, such as an MCP server no toolset uses), or every problem found.
 */
export type AgentFolderResult =
  | { ok: true; value: AgentCreate; skills: SkillSummary[]; warnings: Problem[] }
  | { ok: false; problems: Problem[] };

/** The file that makes a folder an agent folder. */
export const agentFileName = 'AGENTS.md';
/** Metadata key that records the `environment` named in AGENTS.md. */
export const environmentMetadataKey = 'berth.environment';

const agentKeys = [
  'name',
  'model',
  'description',
  'tools',
  'mcp_servers',
  'skills',
  'metadata',
  'environment',
] as const;
const skillKeys = ['name', 'description', 'license', 'compatibility', 'metadata', 'allowed-tools'];
const skillNamePattern = /^[a-z0-9-]+$/;
const maxSkillNameLength = 64;
const maxSkillDescriptionLength = 1024;
const maxCompatibilityLength = 500;

type Path = readonly (string | number)[];

/** A parsed front matter block: its data, and where each key sits in the file. */
interface FrontMatter {
  data: unknown;
  document: Document;
  lineCounter: LineCounter;
  /** The trimmed Markdown after the closing `---`. */
  body: string;
  /** 1-based line where the body starts. */
  bodyLine: number;
}

/**
 * Reads `<dir>/AGENTS.md` and `<dir>/skills/*\/SKILL.md` and assembles agent create params:
 * front matter keys as given (tool shorthand expanded, `environment` stored in metadata), the
 * body as `system`; the skills found are returned beside (`berth apply` uploads them). The result is
 * checked with the API's own `agentCreate` schema, so what loads here is what the server takes.
 */
export async function loadAgentFolder(dir: string): Promise<AgentFolderResult> {
  const problems: Problem[] = [];
  if (!existsSync(dir) || !statSync(dir).isDirectory()) {
    return { ok: false, problems: [{ file: '.', message: `${dir} is not a folder` }] };
  }
  const skills = loadSkills(dir, problems);
  const agentPath = join(dir, agentFileName);
  if (!existsSync(agentPath)) {
    problems.unshift({
      file: agentFileName,
      message: `missing ${agentFileName}: this folder defines no agent`,
    });
    return { ok: false, problems };
  }
  const agentProblems: Problem[] = [];
  const warnings: Problem[] = [];
  const value = assembleAgent(readFileSync(agentPath, 'utf8'), agentProblems, warnings);
  problems.unshift(...agentProblems.sort((a, b) => (a.line ?? 0) - (b.line ?? 0)));
  if (problems.length > 0 || !value) return { ok: false, problems };
  return { ok: true, value, skills, warnings };
}

function assembleAgent(text: string, problems: Problem[], warnings: Problem[]): AgentCreate | undefined {
  const file = agentFileName;
  const frontMatter = readFrontMatter(text, file, problems);
  if (!frontMatter) return undefined;
  const { data } = frontMatter;
  const lineOf = (path: Path) => lineInFrontMatter(frontMatter, path);
  const report = (path: Path, message: string) => problems.push({ file, line: lineOf(path), message });
  if (!isPlainObject(data)) {
    report([], 'the front matter must be a YAML mapping of keys such as name: and model:');
    return undefined;
  }
  // Keys with a problem reported here; the schema's own issues on them would only repeat it.
  const reported = new Set<string>();
  const params: Record<string, unknown> = {};

  for (const key of Object.keys(data)) {
    if ((agentKeys as readonly string[]).includes(key)) continue;
    if (key === 'system')
      report([key], 'the system prompt is the Markdown body after the front matter, not a key');
    else report([key], `unknown key "${key}"; AGENTS.md keys are ${agentKeys.join(', ')}`);
  }
  for (const key of ['name', 'model'] as const) {
    if (data[key] === undefined || data[key] === null) {
      report([], `missing required key "${key}"`);
      reported.add(key);
    }
  }
  for (const key of ['name', 'description', 'skills', 'metadata'] as const) {
    if (data[key] !== undefined) params[key] = data[key];
  }

  const model = data.model;
  if (model !== undefined && model !== null) {
    params.model = model;
    const id = isPlainObject(model) ? model.id : model;
    if (typeof id === 'string') {
      const checked = modelId.safeParse(id);
      if (!checked.success) {
        report(isPlainObject(model) ? ['model', 'id'] : ['model'], `${checked.error.issues[0]?.message}`);
        reported.add('model');
      }
    }
  }

  const serverNames = new Set<string>();
  if (Array.isArray(data.mcp_servers)) {
    params.mcp_servers = data.mcp_servers;
    data.mcp_servers.forEach((server, index) => {
      if (!isPlainObject(server) || typeof server.name !== 'string') return;
      if (serverNames.has(server.name)) {
        report(['mcp_servers', index, 'name'], `MCP server "${server.name}" is declared twice`);
      }
      serverNames.add(server.name);
    });
  } else if (data.mcp_servers !== undefined) {
    report(['mcp_servers'], 'mcp_servers must be a list, e.g. [{name: docs, type: url, url: "https://…"}]');
    reported.add('mcp_servers');
  }

  // Tool entries in params, by the index of the front matter entry each came from.
  const toolSources: number[] = [];
  // The first built-in tool named in shorthand: where the expanded toolset sits in the file.
  let shorthandIndex = -1;
  if (Array.isArray(data.tools)) {
    const tools: unknown[] = [];
    const shorthand: string[] = [];
    let explicitToolset = -1;
    data.tools.forEach((tool, index) => {
      if (typeof tool === 'string') {
        if (!(builtinToolNames as readonly string[]).includes(tool)) {
          report(
            ['tools', index],
            `unknown built-in tool "${tool}"; built-in tools are ${builtinToolNames.join(', ')}`,
          );
          return;
        }
        if (shorthandIndex < 0) {
          shorthandIndex = index;
          tools.push(undefined); // placeholder, filled once every name is known
          toolSources.push(index);
        }
        if (!shorthand.includes(tool)) shorthand.push(tool);
        return;
      }
      if (isPlainObject(tool)) {
        if (tool.type === 'agent_toolset_20260401') explicitToolset = index;
        if (
          tool.type === 'mcp_toolset' &&
          typeof tool.mcp_server_name === 'string' &&
          !serverNames.has(tool.mcp_server_name)
        ) {
          report(
            ['tools', index, 'mcp_server_name'],
            `mcp_toolset uses MCP server "${tool.mcp_server_name}", which mcp_servers does not declare`,
          );
        }
      }
      tools.push(tool);
      toolSources.push(index);
    });
    if (shorthandIndex >= 0) {
      tools[toolSources.indexOf(shorthandIndex)] = {
        type: 'agent_toolset_20260401',
        default_config: { enabled: false },
        configs: shorthand.map((name) => ({ name, enabled: true })),
      };
      if (explicitToolset >= 0) {
        report(
          ['tools', explicitToolset],
          'tools names built-in tools and also has an agent_toolset_20260401 entry; use one or the other',
        );
      }
    }
    params.tools = tools;
  } else if (data.tools !== undefined) {
    report(['tools'], 'tools must be a list, e.g. [bash, read] or [{type: agent_toolset_20260401}]');
    reported.add('tools');
  }
  // A declared server that no toolset enables gives the agent nothing: almost always a mistake.
  const usedServers = new Set(
    (Array.isArray(data.tools) ? data.tools : []).flatMap((tool) =>
      isPlainObject(tool) && tool.type === 'mcp_toolset' && typeof tool.mcp_server_name === 'string'
        ? [tool.mcp_server_name]
        : [],
    ),
  );
  if (Array.isArray(data.mcp_servers)) {
    data.mcp_servers.forEach((server, index) => {
      if (!isPlainObject(server) || typeof server.name !== 'string' || usedServers.has(server.name)) return;
      warnings.push({
        file,
        line: lineOf(['mcp_servers', index, 'name']),
        message: `MCP server "${server.name}" is declared but no mcp_toolset uses it, so the agent gets none of its tools; add {type: mcp_toolset, mcp_server_name: ${server.name}} to tools`,
      });
    });
  }

  if (data.environment !== undefined) {
    if (typeof data.environment !== 'string' || data.environment.trim() === '') {
      report(['environment'], 'environment must be the name of an environment');
    } else if (isPlainObject(data.metadata) && environmentMetadataKey in data.metadata) {
      report(
        ['metadata', environmentMetadataKey],
        `metadata key "${environmentMetadataKey}" is set from environment; set one or the other`,
      );
      reported.add('metadata');
    } else if (data.metadata === undefined || isPlainObject(data.metadata)) {
      params.metadata = { ...(data.metadata ?? {}), [environmentMetadataKey]: data.environment };
    }
  }

  // Skills are not written into the prompt here: `berth apply` uploads them and the server
  // lists each one's name and description at run time (progressive disclosure).
  if (frontMatter.body) params.system = frontMatter.body;

  const checked = agentCreate.safeParse(params);
  if (!checked.success) {
    for (const issue of checked.error.issues) {
      const [top] = issue.path;
      if (typeof top === 'string' && reported.has(top)) continue;
      let path: (string | number)[] = issue.path.filter((part) => typeof part !== 'symbol');
      let line: number;
      if (top === 'system') line = frontMatter.bodyLine;
      else {
        if (top === 'tools' && typeof path[1] === 'number') {
          const source = toolSources[path[1]] ?? 0;
          // The expanded shorthand toolset has no place of its own in the file.
          path = source === shorthandIndex ? ['tools', source] : ['tools', source, ...path.slice(2)];
        }
        if (top === 'metadata' && path[1] === environmentMetadataKey && data.environment !== undefined) {
          path = ['environment'];
        }
        if (issue.code === 'unrecognized_keys' && issue.keys[0]) path = [...path, issue.keys[0]];
        line = lineOf(path);
      }
      const where = top === 'system' ? 'system prompt (the Markdown body)' : formatPath(issue.path);
      problems.push({ file, line, message: where ? `${where}: ${issue.message}` : issue.message });
    }
    return undefined;
  }
  return problems.length > 0 ? undefined : checked.data;
}

function loadSkills(dir: string, problems: Problem[]): SkillSummary[] {
  const skillsDir = join(dir, 'skills');
  if (!existsSync(skillsDir) || !statSync(skillsDir).isDirectory()) return [];
  const skills: SkillSummary[] = [];
  const folders = readdirSync(skillsDir, { withFileTypes: true })
    .filter((entry) => entry.isDirectory())
    .map((entry) => entry.name)
    .sort();
  for (const folder of folders) {
    const file = `skills/${folder}/SKILL.md`;
    const path = join(skillsDir, folder, 'SKILL.md');
    if (!existsSync(path)) {
      problems.push({
        file,
        message: `missing SKILL.md: every folder under skills/ is a skill and needs one`,
      });
      continue;
    }
    const skillProblems: Problem[] = [];
    const skill = readSkill(readFileSync(path, 'utf8'), folder, file, skillProblems);
    problems.push(...skillProblems.sort((a, b) => (a.line ?? 0) - (b.line ?? 0)));
    if (skill) skills.push(skill);
  }
  return skills;
}

/** Checks one SKILL.md against the Agent Skills specification (agentskills.io). */
export function readSkill(
  text: string,
  folder: string,
  file: string,
  problems: Problem[],
): SkillSummary | undefined {
  const frontMatter = readFrontMatter(text, file, problems);
  if (!frontMatter) return undefined;
  const { data } = frontMatter;
  const report = (path: Path, message: string) =>
    problems.push({ file, line: lineInFrontMatter(frontMatter, path), message });
  if (!isPlainObject(data)) {
    report([], 'the front matter must be a YAML mapping with name: and description:');
    return undefined;
  }
  const before = problems.length;
  for (const key of Object.keys(data)) {
    if (!skillKeys.includes(key)) {
      report([key], `unknown key "${key}"; SKILL.md keys are ${skillKeys.join(', ')}`);
    }
  }
  const { name, description } = data;
  if (name === undefined || name === null) report([], 'missing required key "name"');
  else if (typeof name !== 'string') report(['name'], 'name must be a string');
  else {
    if (name.length < 1 || name.length > maxSkillNameLength) {
      report(['name'], `skill name must be 1-${maxSkillNameLength} characters, not ${name.length}`);
    }
    if (!skillNamePattern.test(name)) {
      report(['name'], `skill name "${name}" may hold only lowercase letters, digits and hyphens`);
    } else if (name.startsWith('-') || name.endsWith('-') || name.includes('--')) {
      report(['name'], `skill name "${name}" must not start or end with a hyphen or hold "--"`);
    }
    if (name !== folder) report(['name'], `skill name "${name}" must match its folder name "${folder}"`);
  }
  if (description === undefined || description === null) report([], 'missing required key "description"');
  else if (typeof description !== 'string' || description.trim() === '') {
    report(['description'], 'description must be a non-empty string');
  } else if (description.length > maxSkillDescriptionLength) {
    report(
      ['description'],
      `description is ${description.length} characters; the limit is ${maxSkillDescriptionLength}`,
    );
  }
  if (data.license !== undefined && typeof data.license !== 'string') {
    report(['license'], 'license must be a string');
  }
  const { compatibility } = data;
  if (compatibility !== undefined) {
    if (typeof compatibility !== 'string') report(['compatibility'], 'compatibility must be a string');
    else if (compatibility.length > maxCompatibilityLength) {
      report(
        ['compatibility'],
        `compatibility is ${compatibility.length} characters; the limit is ${maxCompatibilityLength}`,
      );
    }
  }
  if (
    data.metadata !== undefined &&
    !(
      isPlainObject(data.metadata) && Object.values(data.metadata).every((value) => typeof value === 'string')
    )
  ) {
    report(['metadata'], 'metadata must map keys to string values');
  }
  const allowedTools = data['allowed-tools'];
  if (
    allowedTools !== undefined &&
    typeof allowedTools !== 'string' &&
    !(Array.isArray(allowedTools) && allowedTools.every((tool) => typeof tool === 'string'))
  ) {
    report(['allowed-tools'], 'allowed-tools must be a space-separated string of tool names');
  }
  if (problems.length > before) return undefined;
  return { name: name as string, description: description as string, file };
}

/**
 * Splits `---` front matter from the body and parses it, reporting a missing or unclosed block
 * and YAML syntax errors (with their lines). Returns nothing when the front matter is unusable.
 */
function readFrontMatter(text: string, file: string, problems: Problem[]): FrontMatter | undefined {
  const lines = text.replace(/^\uFEFF/, '').split(/\r?\n/);
  if (lines[0]?.trimEnd() !== '---') {
    problems.push({
      file,
      line: 1,
      message: 'missing front matter: the file must start with a --- line, then YAML keys, then a --- line',
    });
    return undefined;
  }
  const closing = lines.findIndex((line, index) => index > 0 && line.trimEnd() === '---');
  if (closing < 0) {
    problems.push({ file, line: 1, message: 'the front matter opened here is never closed with a --- line' });
    return undefined;
  }
  const lineCounter = new LineCounter();
  const document = parseDocument(lines.slice(1, closing).join('\n'), { lineCounter, prettyErrors: false });
  if (document.errors.length > 0) {
    for (const error of document.errors) {
      // The YAML starts on the file's second line.
      problems.push({ file, line: lineCounter.linePos(error.pos[0]).line + 1, message: error.message });
    }
    return undefined;
  }
  return {
    data: document.toJS(),
    document,
    lineCounter,
    body: lines
      .slice(closing + 1)
      .join('\n')
      .trim(),
    bodyLine: closing + 2,
  };
}

/**
 * The file line of the deepest node along `path` that exists: a map key's own line, or a list
 * item's first line. An empty or unknown path points at the opening `---` (line 1).
 */
function lineInFrontMatter(frontMatter: FrontMatter, path: Path): number {
  let node: unknown = frontMatter.document.contents;
  let offset: number | undefined;
  for (const part of path) {
    if (isMap(node)) {
      const pair = node.items.find((item) => isScalar(item.key) && item.key.value === part);
      if (!pair) break;
      offset = (pair.key as Node).range?.[0] ?? offset;
      node = pair.value;
    } else if (isSeq(node) && typeof part === 'number') {
      const item = node.items[part] as Node | undefined;
      if (!item) break;
      offset = item.range?.[0] ?? offset;
      node = item;
    } else break;
  }
  return offset === undefined ? 1 : frontMatter.lineCounter.linePos(offset).line + 1;
}

function formatPath(path: readonly PropertyKey[]): string {
  let result = '';
  for (const part of path) {
    if (typeof part === 'number') result += `[${part}]`;
    else result += result ? `.${String(part)}` : String(part);
  }
  return result;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** The `name` a SKILL.md's front matter declares, if it can be read (for uploads without a folder). */
export function declaredSkillName(text: string): string | undefined {
  const frontMatter = readFrontMatter(text, 'SKILL.md', []);
  const name = isPlainObject(frontMatter?.data) ? frontMatter.data.name : undefined;
  return typeof name === 'string' ? name : undefined;
}
