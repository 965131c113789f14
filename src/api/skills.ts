import { Hono } from 'hono';
import { conflict, invalidRequest, isBerthError, notFound } from '../errors.js';
import { newId } from '../ids.js';
import { MAX_SKILL_BYTES, packageSkill, type SkillFile } from '../skills/skill-package.js';
import type { SkillRecord, SkillVersionRecord } from '../store/skill-store.js';
import {
  type ApiContext,
  type ApiDependencies,
  type ApiEnvironment,
  newRecord,
  nowIso,
  readOrder,
  readPageQuery,
} from './context.js';

/**
 * `/v1/skills` and `/v1/skills/{skill_id}/versions`: the official `client.beta.skills` API.
 * A skill is an Agent Skills folder (SKILL.md with `name` and `description`, and any other
 * files), uploaded as multipart `files` (names carry their paths) or as one zip. Versions are
 * immutable; agents reference a skill by id and a version (or `latest`), and a session pins the
 * version it started with. Skills are tenant-wide, like agents.
 */

/** Largest skill upload accepted, multipart overhead included. */
export const MAX_SKILL_UPLOAD_BYTES = MAX_SKILL_BYTES + 1024 * 1024;

/** The API body of a skill (the official `BetaSkill`; `name` stays internal, as the SDK has none). */
function skillBody(record: SkillRecord): Record<string, unknown> {
  const { name: _name, ...body } = record.body;
  return { ...body, latest_version_id: record.latestVersion, updated_at: record.updatedAt };
}

/** A new version id: a decimal microsecond timestamp, above every earlier version of the skill. */
function nextVersion(after: string | null): string {
  const now = BigInt(Date.now()) * 1000n;
  const previous = after !== null && /^\d+$/.test(after) ? BigInt(after) : 0n;
  return String(now > previous ? now : previous + 1n);
}

/** The uploaded files of a multipart request (`files`, `files[]`), with their paths. */
async function readUpload(context: ApiContext): Promise<{ files: SkillFile[]; displayName?: string }> {
  const type = context.req.header('content-type') ?? '';
  if (!type.startsWith('multipart/form-data')) {
    throw invalidRequest('upload the skill as multipart/form-data with one or more `files` parts');
  }
  let form: FormData;
  try {
    form = await context.req.formData();
  } catch {
    throw invalidRequest('the multipart body could not be read');
  }
  const files: SkillFile[] = [];
  let displayName: string | undefined;
  for (const [name, value] of form.entries()) {
    if (name === 'files' || name === 'files[]') {
      if (typeof value === 'string') throw invalidRequest('files: each part must be a file');
      files.push({ path: value.name, data: new Uint8Array(await value.arrayBuffer()) });
    } else if (name === 'display_name') {
      if (typeof value !== 'string') throw invalidRequest('display_name must be text');
      displayName = value;
    } else {
      throw invalidRequest(`unknown form field ${name}; expected files and display_name`);
    }
  }
  if (displayName !== undefined && (displayName.length > 255 || /[\r\n]/.test(displayName))) {
    throw invalidRequest('display_name must be one line of at most 255 characters');
  }
  return { files, ...(displayName !== undefined && displayName !== '' ? { displayName } : {}) };
}

export function skillRoutes(dependencies: ApiDependencies) {
  const skills = dependencies.store.skills;
  const router = new Hono<ApiEnvironment>();

  async function loadSkill(tenantId: string, id: string): Promise<SkillRecord> {
    const record = await skills.getSkill(tenantId, id);
    if (!record) throw notFound('skill', id);
    return record;
  }

  async function loadVersion(skill: SkillRecord, version: string): Promise<SkillVersionRecord> {
    const wanted = version === 'latest' ? skill.latestVersion : version;
    const record =
      wanted === null ? undefined : await skills.getSkillVersion(skill.tenantId, skill.id, wanted);
    if (!record) throw notFound('skill version', version);
    return record;
  }

  router.post('/', async (context) => {
    const principal = context.get('principal');
    const upload = await readUpload(context);
    const skill = packageSkill(upload.files);
    const id = newId('skill');
    const now = nowIso();
    const version = nextVersion(null);
    const record = newRecord(principal, id, now, {
      type: 'skill',
      id,
      display_name: upload.displayName ?? skill.name,
      name: skill.name,
      source: { type: 'custom' },
      created_at: now,
    });
    await skills.createSkill(record, {
      tenantId: principal.tenantId,
      skillId: id,
      version,
      createdAt: now,
      body: versionBody(id, version, skill, now),
      archive: skill.archive,
    });
    return context.json(skillBody({ ...record, latestVersion: version }));
  });

  router.get('/', async (context) => {
    const { limit, cursor } = readPageQuery(context);
    const source = context.req.query('source');
    if (source !== undefined && source !== '' && source !== 'custom' && source !== 'anthropic') {
      throw invalidRequest('source must be custom or anthropic');
    }
    // Berth hosts only the tenant's own skills: there are no Anthropic-published ones here.
    if (source === 'anthropic') return context.json({ data: [], next_page: null });
    const page = await skills.listSkills({
      tenantId: context.get('principal').tenantId,
      limit,
      cursor,
      order: readOrder(context, 'asc'),
    });
    return context.json({
      data: page.items.map(skillBody),
      next_page: page.nextCursor,
    });
  });

  router.get('/:id', async (context) => {
    const record = await loadSkill(context.get('principal').tenantId, context.req.param('id'));
    return context.json(skillBody(record));
  });

  router.delete('/:id', async (context) => {
    const tenantId = context.get('principal').tenantId;
    const id = context.req.param('id');
    if (!(await skills.deleteSkill(tenantId, id))) throw notFound('skill', id);
    return context.json({ id, type: 'skill_deleted' });
  });

  router.post('/:id/versions', async (context) => {
    const skill = await loadSkill(context.get('principal').tenantId, context.req.param('id'));
    const upload = await readUpload(context);
    if (upload.displayName !== undefined) {
      throw invalidRequest('display_name belongs to the skill, not to a version');
    }
    const uploaded = packageSkill(upload.files);
    const name = skill.body.name as string;
    if (uploaded.name !== name) {
      throw invalidRequest(
        `this skill is named ${name}: every version's SKILL.md must say name: ${name} (it says ${uploaded.name})`,
      );
    }
    const now = nowIso();
    const version = nextVersion(skill.latestVersion);
    const record: SkillVersionRecord = {
      tenantId: skill.tenantId,
      skillId: skill.id,
      version,
      createdAt: now,
      body: versionBody(skill.id, version, uploaded, now),
      archive: uploaded.archive,
    };
    try {
      await skills.addSkillVersion(record, now);
    } catch (error) {
      // Two uploads in the same microsecond: the client may retry.
      if (isBerthError(error, 'conflict')) throw conflict(`version ${version} exists; retry`);
      throw error;
    }
    return context.json(record.body);
  });

  router.get('/:id/versions', async (context) => {
    const skill = await loadSkill(context.get('principal').tenantId, context.req.param('id'));
    const { limit, cursor } = readPageQuery(context);
    const page = await skills.listSkillVersions(skill.tenantId, skill.id, {
      limit,
      cursor,
      order: readOrder(context, 'desc'),
    });
    return context.json({
      data: page.items.map((version) => version.body),
      next_page: page.nextCursor,
    });
  });

  router.get('/:id/versions/:version', async (context) => {
    const skill = await loadSkill(context.get('principal').tenantId, context.req.param('id'));
    return context.json((await loadVersion(skill, context.req.param('version'))).body);
  });

  router.get('/:id/versions/:version/content', async (context) => {
    const skill = await loadSkill(context.get('principal').tenantId, context.req.param('id'));
    const version = await loadVersion(skill, context.req.param('version'));
    return context.body(new Uint8Array(version.archive), 200, {
      'content-type': 'application/zip',
      'content-disposition': `attachment; filename="${skill.body.name as string}.zip"`,
    });
  });

  router.delete('/:id/versions/:version', async (context) => {
    const skill = await loadSkill(context.get('principal').tenantId, context.req.param('id'));
    const named = context.req.param('version');
    const version = named === 'latest' ? (skill.latestVersion ?? named) : named;
    if (!(await skills.deleteSkillVersion(skill.tenantId, skill.id, version))) {
      throw notFound('skill version', version);
    }
    return context.json({ id: version, type: 'skill_version_deleted' });
  });

  return router;
}

function versionBody(
  skillId: string,
  version: string,
  skill: { name: string; description: string },
  now: string,
): Record<string, unknown> {
  return {
    type: 'skill_version',
    id: version,
    skill_id: skillId,
    name: skill.name,
    description: skill.description,
    created_at: now,
  };
}

/** A skill as an agent or session references it. */
export interface SkillReference {
  type: string;
  skill_id: string;
  version?: string | null;
}

/**
 * Checks an agent's skill references: each must be one of the tenant's skills (another
 * tenant's reads exactly like a missing one), and a pinned version must exist. With
 * `resolve`, `latest` becomes the skill's newest version (what a session pins), and each entry
 * gains the skill's name.
 */
export async function checkSkillReferences(
  skills: ApiDependencies['store']['skills'],
  tenantId: string,
  references: readonly SkillReference[],
  options: { resolve?: boolean; field?: string } = {},
): Promise<SkillReference[]> {
  const field = options.field ?? 'skills';
  const resolved: SkillReference[] = [];
  const names = new Set<string>();
  for (const [index, reference] of references.entries()) {
    const where = `${field}[${index}]`;
    if (reference.type !== 'custom') {
      throw invalidRequest(
        `${where}: Berth hosts no Anthropic-published skills (${reference.skill_id}); upload the skill with client.beta.skills.create and reference it as type custom`,
      );
    }
    const skill = await skills.getSkill(tenantId, reference.skill_id);
    if (!skill) throw invalidRequest(`${where}: skill ${reference.skill_id} not found`);
    const wanted =
      !reference.version || reference.version === 'latest' ? skill.latestVersion : reference.version;
    const version = wanted === null ? undefined : await skills.getSkillVersion(tenantId, skill.id, wanted);
    if (!version) {
      throw invalidRequest(
        `${where}: skill ${reference.skill_id} has no version ${reference.version ?? 'latest'}`,
      );
    }
    const name = skill.body.name as string;
    if (names.has(name)) throw invalidRequest(`${where}: two skills named ${name}; skill names must differ`);
    names.add(name);
    resolved.push(
      options.resolve
        ? { type: 'custom', skill_id: skill.id, version: version.version }
        : { ...reference, version: reference.version ?? 'latest' },
    );
  }
  return resolved;
}
