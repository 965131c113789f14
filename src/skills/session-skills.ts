/**
 * Skills in a session, disclosed progressively (the Agent Skills model): the system prompt
 * lists only each skill's name and description; the `skill` tool returns a skill's SKILL.md
 * when the model asks for it, and copies the skill's other files into the sandbox
 * (`/workspace/.skills/<name>/`), where the model reads or runs them as the instructions say.
 * Nothing is loaded or copied before the model asks: a session with skills starts as fast as
 * one without.
 */
import type { HarnessTool, ToolOutcome } from '../harness/harness.js';
import type { SkillStore } from '../store/skill-store.js';
import { SKILL_FILE, type SkillFile, unpackSkill } from './skill-package.js';

/** Where a skill's files go in the sandbox. */
export const SKILLS_DIR = '/workspace/.skills';

/** The tool the model loads a skill with. */
export const skillToolDefinition = {
  name: 'skill',
  description:
    'Load one of the skills listed under "Available skills" in your instructions: returns its full ' +
    'instructions (SKILL.md) and copies its other files (scripts, references, templates) into ' +
    `${SKILLS_DIR}/<name>/. Load a skill before doing a task it applies to, then follow it.`,
  inputSchema: {
    type: 'object',
    properties: { name: { type: 'string', description: 'The name of the skill to load.' } },
    required: ['name'],
    additionalProperties: false,
  },
} as const;

/** A pinned skill of a session, as the session's agent records it. */
export interface SkillPin {
  skill_id: string;
  version?: string | null;
}

interface LoadedSkill {
  name: string;
  description: string;
  instructions: string;
  files: SkillFile[];
}

/** The skills of one session: listed lazily, loaded once per process. */
export class SessionSkills {
  readonly #pins: readonly SkillPin[];
  readonly #load: () => Promise<LoadedSkill[]>;
  #loaded: Promise<LoadedSkill[]> | undefined;
  readonly #copied = new Set<string>();

  /** Without a store there are no skills, whatever the session pinned. */
  constructor(options: { store: SkillStore | undefined; tenantId: string; pins: readonly SkillPin[] }) {
    const { store } = options;
    this.#pins = store ? options.pins : [];
    this.#load = async () => {
      const skills: LoadedSkill[] = [];
      if (!store) return skills;
      for (const pin of this.#pins) {
        const skill = await store.getSkill(options.tenantId, pin.skill_id);
        const wanted = !pin.version || pin.version === 'latest' ? skill?.latestVersion : pin.version;
        const version =
          skill && wanted ? await store.getSkillVersion(options.tenantId, skill.id, wanted) : undefined;
        // A skill deleted after the session pinned it is simply not offered any more.
        if (!version) continue;
        const files = unpackSkill(version.archive);
        const instructions = new TextDecoder().decode(files.find((file) => file.path === SKILL_FILE)?.data);
        skills.push({
          name: version.body.name as string,
          description: version.body.description as string,
          instructions,
          files,
        });
      }
      return skills;
    };
  }

  get empty(): boolean {
    return this.#pins.length === 0;
  }

  #skills(): Promise<LoadedSkill[]> {
    this.#loaded ??= this.#load();
    this.#loaded.catch(() => {
      this.#loaded = undefined;
    });
    return this.#loaded;
  }

  /** The tool, when the session has skills. */
  tools(): HarnessTool[] {
    if (this.empty) return [];
    return [
      {
        name: skillToolDefinition.name,
        description: skillToolDefinition.description,
        inputSchema: skillToolDefinition.inputSchema as unknown as Record<string, unknown>,
        kind: 'builtin',
        readOnly: true,
        permission: 'allow',
      },
    ];
  }

  /** The "Available skills" section of the system prompt: names and descriptions only. */
  async instructions(): Promise<string | undefined> {
    if (this.empty) return undefined;
    const skills = await this.#skills();
    if (skills.length === 0) return undefined;
    return [
      '## Available skills',
      '',
      'Skills are instructions and files for particular tasks. When a task matches a skill below, ' +
        'load it first with the `skill` tool (it returns the full instructions), then follow it.',
      '',
      '<available_skills>',
      ...skills.map(
        (skill) =>
          `<skill>\n<name>${escapeXml(skill.name)}</name>\n<description>${escapeXml(skill.description)}</description>\n</skill>`,
      ),
      '</available_skills>',
    ].join('\n');
  }

  /**
   * Runs the `skill` tool: the skill's SKILL.md, after its other files were written into the
   * sandbox with `writeFile` (once per process; a resumed sandbox keeps them in its snapshot).
   */
  async load(
    input: unknown,
    writeFile: (path: string, data: Uint8Array) => Promise<void>,
  ): Promise<ToolOutcome> {
    const name = (input as { name?: unknown } | null)?.name;
    const skills = await this.#skills();
    const skill = skills.find((candidate) => candidate.name === name);
    if (typeof name !== 'string' || !skill) {
      return {
        content: `No skill named ${JSON.stringify(name)}. Available: ${skills.map((each) => each.name).join(', ') || 'none'}.`,
        isError: true,
      };
    }
    const others = skill.files.filter((file) => file.path !== SKILL_FILE);
    const dir = `${SKILLS_DIR}/${skill.name}`;
    if (others.length > 0 && !this.#copied.has(skill.name)) {
      for (const file of skill.files) await writeFile(`${dir}/${file.path}`, file.data);
      this.#copied.add(skill.name);
    }
    const listing =
      others.length === 0
        ? ''
        : `\n\n[The files of this skill are in ${dir}/ (paths in the instructions are relative to it): ${others
            .map((file) => file.path)
            .join(', ')}]`;
    return { content: `${skill.instructions}${listing}`, isError: false };
  }
}

function escapeXml(text: string): string {
  return text.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;');
}
