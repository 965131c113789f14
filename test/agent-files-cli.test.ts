import { cp, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { applyAgent } from '../src/cli/apply-agent.js';
import { loadAgentFolder } from '../src/config/agent-files.js';
import { berthCli } from './support/berth-cli.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';

const root = resolve(import.meta.dirname, '..');
const examples = join(root, 'examples');

async function load(dir: string) {
  const result = await loadAgentFolder(dir);
  if (!result.ok) throw new Error(JSON.stringify(result.problems));
  return result.value;
}

let berth: TestBerth;
let workDir: string;

beforeAll(async () => {
  berth = await startTestBerth();
  workDir = await mkdtemp(join(tmpdir(), 'berth-apply-'));
});

afterAll(async () => {
  await berth?.dispose();
  if (workDir) await rm(workDir, { recursive: true, force: true });
});

describe('berth apply', () => {
  it('creates version 1, changes nothing on a second apply, and makes version 2 after an edit', async () => {
    const dir = join(workDir, 'file-helper');
    await cp(join(examples, 'file-helper'), dir, { recursive: true });

    const first = await applyAgent(berth.client, await load(dir));
    expect(first.kind).toBe('created');
    expect(first.agent.version).toBe(1);

    const second = await applyAgent(berth.client, await load(dir));
    expect(second).toMatchObject({ kind: 'unchanged', agent: { id: first.agent.id, version: 1 } });

    const agentFile = join(dir, 'AGENTS.md');
    await writeFile(agentFile, `${await readFile(agentFile, 'utf8')}\nAnswer in one paragraph.\n`);
    const third = await applyAgent(berth.client, await load(dir));
    expect(third).toMatchObject({ kind: 'updated', changes: ['system: changed'] });
    expect(third.agent).toMatchObject({ id: first.agent.id, version: 2 });
    expect(third.agent.system).toContain('Answer in one paragraph.');

    const versions = await berth.client.beta.agents.versions.list(first.agent.id);
    expect(versions.data.map((agent) => agent.version)).toEqual([2, 1]);
  });

  it('names each changed field: tools added and removed, metadata keys dropped, the model', async () => {
    const dir = join(workDir, 'changes');
    await cp(join(examples, 'file-helper'), dir, { recursive: true });
    const agentFile = join(dir, 'AGENTS.md');
    const original = await readFile(agentFile, 'utf8');
    const created = await applyAgent(berth.client, { ...(await load(dir)), name: 'changes' });

    await writeFile(
      agentFile,
      original
        .replace('tools: [bash, read, glob, grep]', 'tools: [bash, read, glob, write]')
        .replace('model: scripted/files-overview', 'model: scripted/echo')
        .replace('metadata:\n  example: "true"\n', ''),
    );
    const updated = await applyAgent(berth.client, { ...(await load(dir)), name: 'changes' });
    expect(updated).toMatchObject({
      kind: 'updated',
      changes: [
        'model: scripted/files-overview → scripted/echo',
        'tools: +write, -grep',
        'metadata: -example',
      ],
      agent: { id: created.agent.id, version: 2, metadata: {} },
    });
  });

  it('works from the command line against a running server', async () => {
    const dir = join(workDir, 'demo');
    await cp(join(examples, 'demo'), dir, { recursive: true });
    const options = ['--url', berth.url, '--api-key', berth.apiKey];

    const created = await berthCli(['apply', dir, ...options]);
    expect(created.stderr).toBe('');
    expect(created.code).toBe(0);
    const id = /^created agent (\S+) version 1$/m.exec(created.stdout)?.[1];
    expect(id).toBeDefined();

    const again = await berthCli(['apply', dir, ...options]);
    expect(again.stdout.trim()).toBe(`agent ${id} unchanged (version 1)`);

    const agentFile = join(dir, 'AGENTS.md');
    await writeFile(agentFile, (await readFile(agentFile, 'utf8')).replace('summarise briefly', 'stop'));
    const edited = await berthCli(['apply', dir, ...options]);
    expect(edited.stdout).toBe(`  system: changed\nupdated agent ${id} to version 2\n`);

    await writeFile(agentFile, '---\nname: demo\n---\n');
    const broken = await berthCli(['apply', dir, ...options]);
    expect(broken.code).toBe(1);
    expect(broken.stderr).toContain('AGENTS.md:1: missing required key "model"');
    expect(broken.stdout).toBe('');
  });
});

describe('berth apply with skills', () => {
  it("uploads the folder's skills once, a new version only when a skill changed, and keeps the agent's version", async () => {
    const dir = join(workDir, 'skills-helper');
    await cp(join(examples, 'file-helper'), dir, { recursive: true });
    const agentFile = join(dir, 'AGENTS.md');
    await writeFile(
      agentFile,
      (await readFile(agentFile, 'utf8')).replace('name: file-helper', 'name: skills-helper'),
    );
    const options = ['--url', berth.url, '--api-key', berth.apiKey];

    const created = await berthCli(['apply', dir, ...options]);
    expect(created).toMatchObject({ code: 0, stderr: '' });
    const skillId = /^ {2}skill summarize-files: created (skill_\S+) \(version \d+\)$/m.exec(
      created.stdout,
    )?.[1];
    expect(skillId).toBeDefined();
    const agentId = /^created agent (\S+) version 1$/m.exec(created.stdout)?.[1];
    const agent = await berth.client.beta.agents.retrieve(agentId!);
    expect(agent.skills).toEqual([{ type: 'custom', skill_id: skillId, version: 'latest' }]);
    // The skill's body is not baked into the prompt.
    expect(agent.system ?? '').not.toContain('summarize-files');

    const again = await berthCli(['apply', dir, ...options]);
    expect(again.stdout).toBe(`agent ${agentId} unchanged (version 1)\n`);
    const versions = async () => {
      const ids = [];
      for await (const version of berth.client.beta.skills.versions.list(skillId!)) ids.push(version.id);
      return ids;
    };
    expect(await versions()).toHaveLength(1);

    const skillFile = join(dir, 'skills/summarize-files/SKILL.md');
    await writeFile(skillFile, `${await readFile(skillFile, 'utf8')}\nKeep it under ten lines.\n`);
    const edited = await berthCli(['apply', dir, ...options]);
    const newVersion = /^ {2}skill summarize-files: new version (\d+)$/m.exec(edited.stdout)?.[1];
    expect(newVersion).toBeDefined();
    expect(edited.stdout).toContain(`agent ${agentId} unchanged (version 1)`);
    expect(await versions()).toEqual([newVersion, expect.any(String)]);
  });
});

describe('berth run with an agent folder', () => {
  it('runs examples/file-helper offline: its skill is uploaded and loaded on request, then used', async () => {
    const result = await berthCli([
      'run',
      'examples/file-helper',
      'What is in my workspace?',
      '--url',
      berth.url,
      '--api-key',
      berth.apiKey,
    ]);
    expect(result).toMatchObject({ code: 0, stderr: '' });
    expect(result.stdout).toContain('▸ skill {"name":"summarize-files"}');
    // The skill's body reached the model through the tool, then the model followed it.
    expect(result.stdout).toContain('# Summarize files');
    expect(result.stdout).toContain('▸ $ ls -la /workspace');
    expect(result.stdout).toContain('idle (end_turn)');
  });
});

describe('berth validate', () => {
  it('exits 0 with a summary line for both examples', async () => {
    const demo = await berthCli(['validate', 'examples/demo']);
    expect(demo).toMatchObject({ code: 0, stderr: '' });
    expect(demo.stdout).toMatch(
      /^examples\/demo: OK: agent "berth-demo", model scripted\/demo, 7 tools \(bash, edit, read, write, glob, grep, web_fetch\)/,
    );
    const fileHelper = await berthCli(['validate', 'examples/file-helper']);
    expect(fileHelper).toMatchObject({
      code: 0,
      stdout:
        'examples/file-helper: OK: agent "file-helper", model scripted/files-overview, 4 tools (bash, read, glob, grep), 1 skill (summarize-files)\n',
    });
  });

  it("warns about an MCP server no mcp_toolset uses, fails on a toolset naming a missing one, and passes the README's example", async () => {
    const readme = await readFile(join(root, 'README.md'), 'utf8');
    const example = /### Agents as files[\s\S]*?```markdown\n([\s\S]*?)```/.exec(readme)?.[1];
    expect(example).toContain('mcp_servers:');
    const dir = join(workDir, 'readme-example');
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, 'AGENTS.md'), example!);
    const clean = await berthCli(['validate', 'readme-example'], workDir);
    expect(clean).toMatchObject({ code: 0, stderr: '' });
    expect(clean.stdout).toMatch(/^readme-example: OK: agent "file-helper", .*mcp:docs/);
    expect(clean.stdout).not.toMatch(/warning/);

    // The server declared, no toolset for it: loads, but says the agent gets none of its tools.
    const unused = [
      '---',
      'name: unused',
      'model: scripted/echo',
      'tools: [bash]',
      'mcp_servers: [{name: docs, type: url, url: "https://example.com/mcp"}]',
      '---',
    ].join('\n');
    await writeFile(join(dir, 'AGENTS.md'), unused);
    const warned = await berthCli(['validate', 'readme-example'], workDir);
    expect(warned.code).toBe(0);
    expect(warned.stdout.trim().split('\n')).toEqual([
      'readme-example/AGENTS.md:5: warning: MCP server "docs" is declared but no mcp_toolset uses it, so the agent gets none of its tools; add {type: mcp_toolset, mcp_server_name: docs} to tools',
      expect.stringMatching(/^readme-example: OK: /),
    ]);

    await writeFile(
      join(dir, 'AGENTS.md'),
      unused.replace('tools: [bash]', 'tools: [bash, {type: mcp_toolset, mcp_server_name: dcos}]'),
    );
    const missing = await berthCli(['validate', 'readme-example'], workDir);
    expect(missing.code).toBe(1);
    expect(missing.stdout).toContain(
      'readme-example/AGENTS.md:4: mcp_toolset uses MCP server "dcos", which mcp_servers does not declare',
    );
  }, 120_000);

  it('exits 1 and prints every problem as file:line: message, relative to the working directory', async () => {
    const dir = join(workDir, 'broken');
    await cp(join(examples, 'file-helper'), dir, { recursive: true });
    await writeFile(join(dir, 'AGENTS.md'), '---\nname: broken\nmodel: gpt-4\ntools: [bash, grpe]\n---\n');
    await writeFile(
      join(dir, 'skills/summarize-files/SKILL.md'),
      '---\nname: summarise-files\ndescription: x\n---\n',
    );
    const result = await berthCli(['validate', 'broken'], workDir);
    expect(result.code).toBe(1);
    expect(result.stdout.trim().split('\n')).toEqual([
      expect.stringMatching(/^broken\/AGENTS\.md:3: model must be/),
      expect.stringMatching(/^broken\/AGENTS\.md:4: unknown built-in tool "grpe"/),
      'broken/skills/summarize-files/SKILL.md:2: skill name "summarise-files" must match its folder name "summarize-files"',
    ]);
  });
});
