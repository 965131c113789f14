import Anthropic, { toFile } from '@anthropic-ai/sdk';
import { strToU8, unzipSync, zipSync } from 'fflate';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type FakeOpenAiServer, startFakeOpenAiServer } from './support/fake-openai-server.js';

const SKILL_MD = `---
name: release-notes
description: Writes release notes from a changelog. Use when asked for release notes.
---
# Release notes

1. Run scripts/collect.sh to gather the changes.
2. Group them under Added, Changed and Fixed. SECRET-BODY-MARKER
`;
const SCRIPT = '#!/bin/sh\necho "collected 3 changes"\n';

const file = (path: string, text: string) => toFile(Buffer.from(text), path);
const skillFiles = async (skillMd = SKILL_MD) => [
  await file('release-notes/SKILL.md', skillMd),
  await file('release-notes/scripts/collect.sh', SCRIPT),
];

/** The error body of a refused SDK call. */
async function refusal(call: Promise<unknown>): Promise<{ status: number; message: string; type: string }> {
  const error = await call.then(
    () => undefined,
    (caught: unknown) => caught,
  );
  if (!(error instanceof Anthropic.APIError)) throw new Error(`expected an API error, got ${String(error)}`);
  const body = error.error as { type: string; error: { type: string; message: string } };
  expect(body.type).toBe('error');
  return { status: error.status ?? 0, message: body.error.message, type: body.error.type };
}

describe('skills (client.beta.skills) and progressive disclosure', () => {
  let berth: TestBerth;
  let model: FakeOpenAiServer;

  beforeAll(async () => {
    // The model loads the skill, runs the skill's script from the sandbox, then answers.
    model = await startFakeOpenAiServer((request) => {
      const messages = request.body.messages ?? [];
      const toolResults = messages.filter((message) => message.role === 'tool').length;
      if (toolResults === 0) return { toolCalls: [{ name: 'skill', arguments: { name: 'release-notes' } }] };
      if (toolResults === 1) {
        return {
          toolCalls: [
            {
              name: 'bash',
              arguments: { command: 'sh /workspace/.skills/release-notes/scripts/collect.sh' },
            },
          ],
        };
      }
      return { text: 'Release notes written.' };
    });
    berth = await startTestBerth({ environment: { OPENAI_COMPATIBLE_BASE_URL: model.url } });
  });
  afterAll(async () => {
    await berth?.dispose();
    await model?.close();
  });

  it('creates, lists, retrieves, versions, downloads and deletes skills with the official SDK', async () => {
    const skills = berth.client.beta.skills;
    const created = await skills.create({ files: await skillFiles() });
    expect(created).toMatchObject({
      type: 'skill',
      display_name: 'release-notes',
      source: { type: 'custom' },
    });
    expect(created.id).toMatch(/^skill_/);
    expect(created.latest_version_id).toMatch(/^\d+$/);
    expect(await skills.retrieve(created.id)).toMatchObject({
      id: created.id,
      latest_version_id: created.latest_version_id,
    });

    const first = await skills.versions.retrieve(created.latest_version_id, { skill_id: created.id });
    expect(first).toMatchObject({
      type: 'skill_version',
      skill_id: created.id,
      name: 'release-notes',
      description: 'Writes release notes from a changelog. Use when asked for release notes.',
    });

    // A new version: the latest moves, the old one stays readable.
    const second = await skills.versions.create(created.id, {
      files: await skillFiles(SKILL_MD.replace('Fixed.', 'Fixed, newest first.')),
    });
    expect(BigInt(second.id) > BigInt(first.id)).toBe(true);
    expect((await skills.retrieve(created.id)).latest_version_id).toBe(second.id);
    const listed = [];
    for await (const version of skills.versions.list(created.id)) listed.push(version.id);
    expect(listed).toEqual([second.id, first.id]);

    // The download is a zip of the skill's folder, byte for byte.
    const download = await skills.versions.download(first.id, { skill_id: created.id });
    expect(download.headers.get('content-type')).toBe('application/zip');
    const unzipped = unzipSync(new Uint8Array(await download.arrayBuffer()));
    expect(Object.keys(unzipped).sort()).toEqual([
      'release-notes/SKILL.md',
      'release-notes/scripts/collect.sh',
    ]);
    expect(Buffer.from(unzipped['release-notes/SKILL.md']!).toString()).toBe(SKILL_MD);

    const all = [];
    for await (const skill of skills.list()) all.push(skill.id);
    expect(all).toContain(created.id);

    expect(await skills.versions.delete(first.id, { skill_id: created.id })).toEqual({
      id: first.id,
      type: 'skill_version_deleted',
    });
    expect((await refusal(skills.versions.retrieve(first.id, { skill_id: created.id }))).status).toBe(404);
    expect(await skills.delete(created.id)).toEqual({ id: created.id, type: 'skill_deleted' });
    expect((await refusal(skills.retrieve(created.id))).status).toBe(404);
  });

  it('takes a zip of the folder, or the files without a folder, as the same skill', async () => {
    const zipped = zipSync({
      'release-notes/SKILL.md': strToU8(SKILL_MD),
      'release-notes/scripts/collect.sh': strToU8(SCRIPT),
    });
    const fromZip = await berth.client.beta.skills.create({
      files: [await toFile(Buffer.from(zipped), 'skill.zip')],
    });
    const bare = await berth.client.beta.skills.create({
      display_name: 'Release notes (bare)',
      files: [await file('SKILL.md', SKILL_MD), await file('scripts/collect.sh', SCRIPT)],
    });
    expect(bare.display_name).toBe('Release notes (bare)');
    for (const skill of [fromZip, bare]) {
      const download = await berth.client.beta.skills.versions.download(skill.latest_version_id, {
        skill_id: skill.id,
      });
      expect(Object.keys(unzipSync(new Uint8Array(await download.arrayBuffer()))).sort()).toEqual([
        'release-notes/SKILL.md',
        'release-notes/scripts/collect.sh',
      ]);
    }
  });

  it('refuses bad uploads with a clear 4xx and stores nothing', async () => {
    const skills = berth.client.beta.skills;
    const count = async () => {
      let total = 0;
      for await (const _ of skills.list()) total++;
      return total;
    };
    const before = await count();
    const cases: [Promise<unknown>, RegExp][] = [
      [skills.create({ files: [await file('release-notes/README.md', 'no skill file')] }), /no SKILL\.md/],
      [
        skills.create({
          files: [
            await file(
              'Release-Notes/SKILL.md',
              SKILL_MD.replace('name: release-notes', 'name: Release-Notes'),
            ),
          ],
        }),
        /line 2: skill name "Release-Notes" may hold only lowercase letters/,
      ],
      [
        skills.create({ files: [await file('other-name/SKILL.md', SKILL_MD)] }),
        /must match its folder name "other-name"/,
      ],
      [
        skills.create({
          files: [
            await file(
              'release-notes/SKILL.md',
              SKILL_MD.replace(/description: .*/, `description: ${'x'.repeat(1100)}`),
            ),
          ],
        }),
        /description is 1100 characters; the limit is 1024/,
      ],
      [
        skills.create({ files: [await file('release-notes/SKILL.md', '# no front matter')] }),
        /missing front matter/,
      ],
      [
        skills.create({
          files: [...(await skillFiles()), await file('release-notes/../../etc/passwd', 'x')],
        }),
        /must not contain "\.\."/,
      ],
      [
        skills.create({ files: [...(await skillFiles()), await file('elsewhere/notes.md', 'x')] }),
        /outside the skill's folder/,
      ],
      [skills.create({ files: [await toFile(Buffer.from('not a zip'), 'skill.zip')] }), /not a readable zip/],
    ];
    for (const [call, message] of cases) {
      const refused = await refusal(call);
      expect(refused.status).toBe(400);
      expect(refused.type).toBe('invalid_request_error');
      expect(refused.message).toMatch(message);
    }
    // Over the size limit: 413 before anything is parsed.
    const big = await refusal(
      skills.create({
        files: [
          ...(await skillFiles()),
          await toFile(Buffer.alloc(9 * 1024 * 1024), 'release-notes/big.bin'),
        ],
      }),
    );
    expect(big.status).toBe(413);
    // Not multipart at all.
    const json = await fetch(`${berth.url}/v1/skills`, {
      method: 'POST',
      headers: { 'x-api-key': berth.apiKey, 'content-type': 'application/json' },
      body: '{}',
    });
    expect(json.status).toBe(400);
    expect(await count()).toBe(before);

    // A version must keep the skill's name.
    const created = await skills.create({ files: await skillFiles() });
    const renamed = await refusal(
      skills.versions.create(created.id, {
        files: [await file('changelog/SKILL.md', SKILL_MD.replace('name: release-notes', 'name: changelog'))],
      }),
    );
    expect(renamed.message).toMatch(/this skill is named release-notes/);
    expect((await skills.retrieve(created.id)).latest_version_id).toBe(created.latest_version_id);
  });

  it('refuses agents that reference a skill the tenant does not have', async () => {
    const unknown = await refusal(
      berth.client.beta.agents.create({
        name: 'no-such-skill',
        model: 'openai-compatible/fake-model',
        skills: [{ type: 'custom', skill_id: 'skill_01nonexistent' }],
      }),
    );
    expect(unknown).toMatchObject({
      status: 400,
      message: expect.stringMatching(/skills\[0\]: skill skill_01nonexistent not found/),
    });
    const anthropic = await refusal(
      berth.client.beta.agents.create({
        name: 'anthropic-skill',
        model: 'openai-compatible/fake-model',
        skills: [{ type: 'anthropic', skill_id: 'xlsx' }],
      }),
    );
    expect(anthropic.message).toMatch(/hosts no Anthropic-published skills/);
    const skill = await berth.client.beta.skills.create({ files: await skillFiles() });
    const clash = await refusal(
      berth.client.beta.agents.create({
        name: 'tool-clash',
        model: 'openai-compatible/fake-model',
        tools: [{ type: 'custom', name: 'skill', description: 'mine', input_schema: { type: 'object' } }],
        skills: [{ type: 'custom', skill_id: skill.id }],
      }),
    );
    expect(clash.message).toMatch(/clashes with the tool that loads the agent's skills/);
  });

  it('lists only names and descriptions in the prompt, loads the body on request, and copies the files into the sandbox', async () => {
    const skill = await berth.client.beta.skills.create({ files: await skillFiles() });
    const agent = await berth.client.beta.agents.create({
      name: 'with-skill',
      model: 'openai-compatible/fake-model',
      system: 'You help with releases.',
      tools: [{ type: 'agent_toolset_20260401' }],
      skills: [{ type: 'custom', skill_id: skill.id }],
    });
    const environment = await berth.client.beta.environments.create({ name: 'skills' });
    const session = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
    });
    // The session pinned the version current at its start: a newer upload does not change it.
    await berth.client.beta.skills.versions.create(skill.id, {
      files: await skillFiles(SKILL_MD.replace('SECRET-BODY-MARKER', 'NEWER-VERSION-MARKER')),
    });
    const before = model.requests.length;
    const stream = await berth.client.beta.sessions.events.stream(session.id);
    await berth.client.beta.sessions.events.send(session.id, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: 'Write the release notes.' }] }],
    });
    for await (const event of stream) if (event.type === 'session.status_idle') break;

    const requests = model.requests.slice(before);
    expect(requests).toHaveLength(3);
    const system = JSON.stringify(requests[0]!.body.messages?.find((message) => message.role === 'system'));
    expect(system).toContain('You help with releases.');
    expect(system).toContain('<name>release-notes</name>');
    expect(system).toContain('Writes release notes from a changelog.');
    // Progressive disclosure: the body is not in the prompt until the model asks for it.
    expect(system).not.toContain('SECRET-BODY-MARKER');
    expect((requests[0]!.body.tools ?? []).map((tool) => tool.function.name)).toContain('skill');

    const events = [];
    for await (const event of berth.client.beta.sessions.events.list(session.id)) events.push(event);
    const results = events.filter((event) => event.type === 'agent.tool_result') as unknown as {
      content: { type: string; text: string }[];
      is_error?: boolean;
    }[];
    expect(results).toHaveLength(2);
    const loaded = results[0]!.content.map((block) => block.text).join('');
    expect(loaded).toContain('SECRET-BODY-MARKER');
    expect(loaded).not.toContain('NEWER-VERSION-MARKER');
    expect(loaded).toContain('/workspace/.skills/release-notes/');
    expect(loaded).toContain('scripts/collect.sh');
    // The skill's script ran from the sandbox copy.
    expect(results[1]!.content.map((block) => block.text).join('')).toContain('collected 3 changes');
    // And the model saw the body only after loading it.
    expect(JSON.stringify(requests[1]!.body.messages)).toContain('SECRET-BODY-MARKER');
  });
});
