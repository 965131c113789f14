import type { ListQuery, Page, ResourceRecord } from './resource-store.js';

/**
 * The skill port: skills (Agent Skills folders uploaded through `client.beta.skills`) and their
 * immutable versions. A skill row keeps its API body; a version row keeps its API body and its
 * files, packed as one zip archive whose top-level directory is the skill's name. Every call
 * names the tenant; versions are reached only through their skill.
 */

/** A skill row; `latestVersion` is its newest version still stored (null when none is left). */
export interface SkillRecord extends ResourceRecord {
  latestVersion: string | null;
}

/** One version of a skill. */
export interface SkillVersionRecord {
  tenantId: string;
  skillId: string;
  /** The version's id (a decimal microsecond timestamp, increasing per skill). */
  version: string;
  createdAt: string;
  /** The API body (`type: 'skill_version'`, name, description, …). */
  body: Record<string, unknown>;
  /** The version's files as a zip archive. */
  archive: Uint8Array;
}

export interface SkillStore {
  /**
   * Inserts a skill and its first version in one transaction (`latestVersion` of the record is
   * ignored; it is derived). `conflict` when the skill id is taken.
   */
  createSkill(skill: ResourceRecord, first: SkillVersionRecord): Promise<void>;
  getSkill(tenantId: string, id: string): Promise<SkillRecord | undefined>;
  /** Pages through a tenant's skills in creation order. */
  listSkills(query: ListQuery): Promise<Page<SkillRecord>>;
  /**
   * Inserts a version of an existing skill of the tenant and sets the skill's `updated_at`, in
   * one transaction. `not_found` when the skill is not the tenant's; `conflict` when the version
   * id is taken for that skill.
   */
  addSkillVersion(version: SkillVersionRecord, updatedAt: string): Promise<void>;
  getSkillVersion(
    tenantId: string,
    skillId: string,
    version: string,
  ): Promise<SkillVersionRecord | undefined>;
  /** Pages through a skill's versions in creation order, without their archives. */
  listSkillVersions(
    tenantId: string,
    skillId: string,
    query: Omit<ListQuery, 'tenantId'>,
  ): Promise<Page<Omit<SkillVersionRecord, 'archive'>>>;
  /** Deletes one version. Returns false if it did not exist. */
  deleteSkillVersion(tenantId: string, skillId: string, version: string): Promise<boolean>;
  /** Deletes a skill and every version of it. Returns false if it did not exist. */
  deleteSkill(tenantId: string, id: string): Promise<boolean>;
}
