/**
 * The skills of an agent folder (`skills/<name>/`), uploaded with the official
 * `client.beta.skills` API: a skill the server does not have yet is created; one whose files
 * differ from its latest version gets a new version; an unchanged one is left alone. The agent
 * then references each skill by id at `latest`, so the agent itself changes only when the list
 * of skills does.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative, sep } from 'node:path';
import type Anthropic from '@anthropic-ai/sdk';
import { toFile } from '@anthropic-ai/sdk';
import type { SkillSummary } from '../config/agent-files.js';
import { unpackSkill } from '../skills/skill-package.js';

type Skill = Anthropic.Beta.Skills.BetaSkill;

export interface SyncedSkills {
  /** The agent's `skills` entries. */
  references: { type: 'custom'; skill_id: string; version: 'latest' }[];
  /** What changed on the server, one line per skill (empty when nothing did). */
  changes: string[];
}

/** Every regular file under `root`, paths relative to it with `/` separators. */
function filesOf(root: string): Map<string, Uint8Array> {
  const files = new Map<string, Uint8Array>();
  const walk = (dir: string) => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) walk(path);
      else if (entry.isFile()) files.set(relative(root, path).split(sep).join('/'), readFileSync(path));
    }
  };
  walk(root);
  return files;
}

function sameFiles(a: ReadonlyMap<string, Uint8Array>, b: ReadonlyMap<string, Uint8Array>): boolean {
  if (a.size !== b.size) return false;
  for (const [path, data] of a) {
    const other = b.get(path);
    if (!other || Buffer.compare(Buffer.from(data), Buffer.from(other)) !== 0) return false;
  }
  return true;
}

/** The newest custom skill whose display name is `name`, if any. */
async function findSkill(client: Anthropic, name: string): Promise<Skill | undefined> {
  let newest: Skill | undefined;
  for await (const skill of client.beta.skills.list({ limit: 100, source: 'custom' })) {
    if (skill.display_name !== name) continue;
    if (!newest || skill.created_at > newest.created_at) newest = skill;
  }
  return newest;
}

/** Uploads the folder's skills where they changed; returns the agent's references to them. */
export async function syncSkills(
  client: Anthropic,
  dir: string,
  skills: readonly SkillSummary[],
): Promise<SyncedSkills> {
  const synced: SyncedSkills = { references: [], changes: [] };
  for (const summary of skills) {
    const local = filesOf(join(dir, 'skills', summary.name));
    const upload = () =>
      Promise.all([...local].map(([path, data]) => toFile(Buffer.from(data), `${summary.name}/${path}`)));
    const existing = await findSkill(client, summary.name);
    if (!existing) {
      const created = await client.beta.skills.create({ display_name: summary.name, files: await upload() });
      synced.changes.push(
        `skill ${summary.name}: created ${created.id} (version ${created.latest_version_id})`,
      );
      synced.references.push({ type: 'custom', skill_id: created.id, version: 'latest' });
      continue;
    }
    let current = new Map<string, Uint8Array>();
    if (existing.latest_version_id) {
      const response = await client.beta.skills.versions.download(existing.latest_version_id, {
        skill_id: existing.id,
      });
      current = new Map(
        unpackSkill(new Uint8Array(await response.arrayBuffer())).map((file) => [file.path, file.data]),
      );
    }
    if (!sameFiles(local, current)) {
      const version = await client.beta.skills.versions.create(existing.id, { files: await upload() });
      synced.changes.push(`skill ${summary.name}: new version ${version.id}`);
    }
    synced.references.push({ type: 'custom', skill_id: existing.id, version: 'latest' });
  }
  return synced;
}
