import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type AgentFolderResult, loadAgentFolder, type Problem } from './agent-files.js';

const folders: string[] = [];

/** Writes files (path relative to a new temp folder → content) and returns the folder. */
async function agentFolder(files: Record<string, string>): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'berth-agent-files-'));
  folders.push(dir);
  for (const [path, content] of Object.entries(files)) {
    await mkdir(dirname(join(dir, path)), { recursive: true });
    await writeFile(join(dir, path), content);
  }
  return dir;
}

afterEach(async () => {
  await Promise.all(folders.splice(0).map((dir) => rm(dir, { recursive: true, force: true })));
});

function problemsOf(result: AgentFolderResult): Problem[] {
  if (result.ok) throw new Error(`expected problems, got ${JSON.stringify(result.value)}`);
  return result.problems;
}

const skill = (name: string, description = 'Does a thing. Use when asked to do the thing.') =>
  `---\nname: ${name}\ndescription: ${description}\n---\n\n# ${name}\n\nSteps.\n`;

describe('loadAgentFolder', () => {
  it('turns front matter into params, the body into the system prompt, and lists skills after it', async () => {
    const dir = await agentFolder({
      'AGENTS.md': [
        '---',
        'name: helper',
        'model: scripted/echo',
        'description: Helps.',
        'tools: [bash, read, write]',
        'mcp_servers:',
        '  - {name: docs, type: url, url: "https://example.com/mcp"}',
        'environment: default',
        'metadata:',
        '  team: tools',
        '---',
        '',
        'You are helpful.',
        '',
      ].join('\n'),
      'skills/summarize-files/SKILL.md': skill('summarize-files', 'Summarizes files. Use for overviews.'),
      'skills/a-first/SKILL.md': skill('a-first'),
    });
    const result = await loadAgentFolder(dir);
    if (!result.ok) throw new Error(JSON.stringify(result.problems));
    const { value, skills } = result;
    expect(value.name).toBe('helper');
    expect(value.model).toBe('scripted/echo');
    expect(value.description).toBe('Helps.');
    expect(value.tools).toEqual([
      {
        type: 'agent_toolset_20260401',
        default_config: { enabled: false },
        configs: [
          { name: 'bash', enabled: true },
          { name: 'read', enabled: true },
          { name: 'write', enabled: true },
        ],
      },
    ]);
    expect(value.mcp_servers).toEqual([{ name: 'docs', type: 'url', url: 'https://example.com/mcp' }]);
    expect(value.metadata).toEqual({ team: 'tools', 'berth.environment': 'default' });
    // The prompt is the body alone: skills are uploaded by `berth apply` and listed by the
    // server at run time, and their bodies load only when the model asks.
    expect(value.system).toBe('You are helpful.');
    expect(value.system).not.toContain('Steps.');
    expect(skills.map((entry) => entry.file)).toEqual([
      'skills/a-first/SKILL.md',
      'skills/summarize-files/SKILL.md',
    ]);
  });

  it('accepts tools in the API shape and keeps a shorthand toolset beside MCP toolsets', async () => {
    const dir = await agentFolder({
      'AGENTS.md': [
        '---',
        'name: mixed',
        'model: {id: anthropic/claude-sonnet-4-5, speed: fast}',
        'tools:',
        '  - grep',
        '  - type: mcp_toolset',
        '    mcp_server_name: docs',
        '  - glob',
        'mcp_servers: [{name: docs, type: url, url: "https://example.com/mcp"}]',
        '---',
      ].join('\n'),
    });
    const result = await loadAgentFolder(dir);
    if (!result.ok) throw new Error(JSON.stringify(result.problems));
    expect(result.value.system).toBeUndefined();
    expect(result.value.tools).toEqual([
      {
        type: 'agent_toolset_20260401',
        default_config: { enabled: false },
        configs: [
          { name: 'grep', enabled: true },
          { name: 'glob', enabled: true },
        ],
      },
      { type: 'mcp_toolset', mcp_server_name: 'docs' },
    ]);
  });

  it('loads both examples, and the demo AGENTS.md matches its agent.json', async () => {
    const examples = resolve(import.meta.dirname, '../../examples');
    const demo = await loadAgentFolder(join(examples, 'demo'));
    if (!demo.ok) throw new Error(JSON.stringify(demo.problems));
    expect(demo.value).toEqual(JSON.parse(await readFile(join(examples, 'demo/agent.json'), 'utf8')));
    const fileHelper = await loadAgentFolder(join(examples, 'file-helper'));
    if (!fileHelper.ok) throw new Error(JSON.stringify(fileHelper.problems));
    expect(fileHelper.skills.map((entry) => entry.name)).toEqual(['summarize-files']);
  });

  it('reports a missing AGENTS.md and still checks the skills', async () => {
    const dir = await agentFolder({ 'skills/wrong/SKILL.md': skill('right') });
    expect(problemsOf(await loadAgentFolder(dir))).toEqual([
      { file: 'AGENTS.md', message: 'missing AGENTS.md: this folder defines no agent' },
      {
        file: 'skills/wrong/SKILL.md',
        line: 2,
        message: 'skill name "right" must match its folder name "wrong"',
      },
    ]);
  });

  it('reports missing and unterminated front matter on line 1', async () => {
    const missing = await agentFolder({ 'AGENTS.md': 'name: x\nmodel: scripted/echo\n' });
    expect(problemsOf(await loadAgentFolder(missing))).toEqual([
      {
        file: 'AGENTS.md',
        line: 1,
        message: 'missing front matter: the file must start with a --- line, then YAML keys, then a --- line',
      },
    ]);
    const open = await agentFolder({ 'AGENTS.md': '---\nname: x\nmodel: scripted/echo\n\nBody\n' });
    expect(problemsOf(await loadAgentFolder(open))).toEqual([
      { file: 'AGENTS.md', line: 1, message: 'the front matter opened here is never closed with a --- line' },
    ]);
  });

  it('reports YAML syntax errors with their line', async () => {
    const dir = await agentFolder({
      'AGENTS.md': '---\nname: x\nmodel: scripted/echo\ndescription: "unclosed\n---\nBody\n',
    });
    const problems = problemsOf(await loadAgentFolder(dir));
    expect(problems.length).toBeGreaterThan(0);
    expect(problems[0]).toMatchObject({ file: 'AGENTS.md', line: 4 });
    expect(problems[0]!.message).toMatch(/quote|Missing closing/i);

    const duplicate = await agentFolder({
      'AGENTS.md': '---\nname: x\nmodel: scripted/echo\nname: y\n---\n',
    });
    expect(problemsOf(await loadAgentFolder(duplicate))).toEqual([
      { file: 'AGENTS.md', line: 4, message: 'Map keys must be unique' },
    ]);
  });

  it('reports a missing name and a missing model together', async () => {
    const dir = await agentFolder({ 'AGENTS.md': '---\ndescription: nameless\n---\nBody\n' });
    expect(problemsOf(await loadAgentFolder(dir))).toEqual([
      { file: 'AGENTS.md', line: 1, message: 'missing required key "name"' },
      { file: 'AGENTS.md', line: 1, message: 'missing required key "model"' },
    ]);
  });

  it('reports a bad model id on the model line, once', async () => {
    const dir = await agentFolder({ 'AGENTS.md': '---\nname: x\n\nmodel: gpt-4\n---\n' });
    const problems = problemsOf(await loadAgentFolder(dir));
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatchObject({ file: 'AGENTS.md', line: 4 });
    expect(problems[0]!.message).toMatch(/model must be "<provider>\/<model>"/);
  });

  it('reports an unknown built-in tool name on its own line', async () => {
    const dir = await agentFolder({
      'AGENTS.md': '---\nname: x\nmodel: scripted/echo\ntools:\n  - bash\n  - grpe\n---\n',
    });
    const problems = problemsOf(await loadAgentFolder(dir));
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatchObject({ file: 'AGENTS.md', line: 6 });
    expect(problems[0]!.message).toMatch(/^unknown built-in tool "grpe"; built-in tools are bash, edit/);
  });

  it('warns, with its line, about an MCP server that no mcp_toolset uses', async () => {
    const dir = await agentFolder({
      'AGENTS.md': [
        '---',
        'name: x',
        'model: scripted/echo',
        'mcp_servers:',
        '  - {name: docs, type: url, url: "https://example.com/mcp"}',
        '  - {name: search, type: url, url: "https://example.com/search"}',
        'tools: [bash, {type: mcp_toolset, mcp_server_name: search}]',
        '---',
      ].join('\n'),
    });
    const result = await loadAgentFolder(dir);
    if (!result.ok) throw new Error(JSON.stringify(result.problems));
    expect(result.warnings).toEqual([
      {
        file: 'AGENTS.md',
        line: 5,
        message:
          'MCP server "docs" is declared but no mcp_toolset uses it, so the agent gets none of its tools; add {type: mcp_toolset, mcp_server_name: docs} to tools',
      },
    ]);
  });

  it('reports an mcp_toolset whose server mcp_servers does not declare', async () => {
    const dir = await agentFolder({
      'AGENTS.md': [
        '---',
        'name: x',
        'model: scripted/echo',
        'mcp_servers: [{name: docs, type: url, url: "https://example.com/mcp"}]',
        'tools:',
        '  - type: mcp_toolset',
        '    mcp_server_name: dcos',
        '---',
      ].join('\n'),
    });
    expect(problemsOf(await loadAgentFolder(dir))).toEqual([
      {
        file: 'AGENTS.md',
        line: 7,
        message: 'mcp_toolset uses MCP server "dcos", which mcp_servers does not declare',
      },
    ]);
  });

  it('maps schema issues to the line of the offending key', async () => {
    const dir = await agentFolder({
      'AGENTS.md': [
        '---',
        'name: x',
        'model: scripted/echo',
        'tools:',
        '  - type: agent_toolset_20260401',
        '    configs:',
        '      - name: bash',
        '        colour: blue',
        'metadata:',
        '  count: 3',
        'temperature: 0.2',
        '---',
      ].join('\n'),
    });
    const problems = problemsOf(await loadAgentFolder(dir));
    expect(problems.map(({ line, message }) => [line, message])).toEqual([
      [8, 'tools[0].configs[0]: Unrecognized key: "colour"'],
      [10, 'metadata.count: Invalid input: expected string, received number'],
      [
        11,
        'unknown key "temperature"; AGENTS.md keys are name, model, description, tools, mcp_servers, skills, metadata, environment',
      ],
    ]);
  });

  it('refuses a system key: the system prompt is the body', async () => {
    const dir = await agentFolder({ 'AGENTS.md': '---\nname: x\nmodel: scripted/echo\nsystem: hi\n---\n' });
    expect(problemsOf(await loadAgentFolder(dir))).toEqual([
      {
        file: 'AGENTS.md',
        line: 4,
        message: 'the system prompt is the Markdown body after the front matter, not a key',
      },
    ]);
  });

  it('checks every skill against the Agent Skills rules', async () => {
    const dir = await agentFolder({
      'AGENTS.md': '---\nname: x\nmodel: scripted/echo\n---\nBody\n',
      'skills/other/SKILL.md': skill('different'),
      'skills/Bad_Name/SKILL.md': skill('Bad_Name'),
      'skills/a--b/SKILL.md': skill('a--b'),
      'skills/long/SKILL.md': `---\nname: long\nlicense: MIT\ndescription: ${'x'.repeat(1025)}\n---\n`,
      'skills/plain/SKILL.md': '# Just Markdown\n',
      'skills/empty/README.md': 'no SKILL.md here',
      'skills/nameless/SKILL.md': '---\ndescription: ok\nmodel: opus\n---\n',
    });
    expect(problemsOf(await loadAgentFolder(dir))).toEqual([
      {
        file: 'skills/Bad_Name/SKILL.md',
        line: 2,
        message: 'skill name "Bad_Name" may hold only lowercase letters, digits and hyphens',
      },
      {
        file: 'skills/a--b/SKILL.md',
        line: 2,
        message: 'skill name "a--b" must not start or end with a hyphen or hold "--"',
      },
      {
        file: 'skills/empty/SKILL.md',
        message: 'missing SKILL.md: every folder under skills/ is a skill and needs one',
      },
      { file: 'skills/long/SKILL.md', line: 4, message: 'description is 1025 characters; the limit is 1024' },
      { file: 'skills/nameless/SKILL.md', line: 1, message: 'missing required key "name"' },
      {
        file: 'skills/nameless/SKILL.md',
        line: 3,
        message:
          'unknown key "model"; SKILL.md keys are name, description, license, compatibility, metadata, allowed-tools',
      },
      {
        file: 'skills/other/SKILL.md',
        line: 2,
        message: 'skill name "different" must match its folder name "other"',
      },
      {
        file: 'skills/plain/SKILL.md',
        line: 1,
        message: 'missing front matter: the file must start with a --- line, then YAML keys, then a --- line',
      },
    ]);
  });

  it('reports every problem in one pass, AGENTS.md first, in line order', async () => {
    const dir = await agentFolder({
      'AGENTS.md': '---\nname: x\nmodel: gpt-4\ntools: [bash, grpe]\nenvironment: 3\n---\nBody\n',
      'skills/one/SKILL.md': skill('two'),
    });
    expect(problemsOf(await loadAgentFolder(dir)).map(({ file, line }) => `${file}:${line}`)).toEqual([
      'AGENTS.md:3',
      'AGENTS.md:4',
      'AGENTS.md:5',
      'skills/one/SKILL.md:2',
    ]);
  });
});
