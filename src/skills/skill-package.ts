/**
 * A skill as uploaded (`client.beta.skills.create`): an Agent Skills folder, sent as files whose
 * names carry their paths (`my-skill/SKILL.md`, `my-skill/scripts/run.py`) or as one zip of
 * that folder. `packageSkill` checks it (one top-level folder, a SKILL.md at its root that meets
 * the Agent Skills rules, safe relative paths, size limits) and packs it as one zip archive with
 * the skill's name as its top-level folder; `unpackSkill` gives the files back.
 */
import { type Unzipped, unzipSync, zipSync } from 'fflate';
import { declaredSkillName, type Problem, readSkill } from '../config/agent-files.js';
import { invalidRequest } from '../errors.js';

/** Most bytes a skill version may hold, all files together (the official API's limit too). */
export const MAX_SKILL_BYTES = 8 * 1024 * 1024;
/** Most files in one skill version. */
export const MAX_SKILL_FILES = 1000;
/** The file every skill has at its root. */
export const SKILL_FILE = 'SKILL.md';

/** One file of a skill, its path relative to the skill's folder (`SKILL.md`, `scripts/run.py`). */
export interface SkillFile {
  path: string;
  data: Uint8Array;
}

/** A checked skill, ready to store. */
export interface SkillPackage {
  name: string;
  description: string;
  /** SKILL.md as text (front matter and instructions). */
  instructions: string;
  files: SkillFile[];
  /** The files zipped under `<name>/`. */
  archive: Uint8Array;
}

/** Splits an uploaded path into segments, refusing `..` (a drive letter or leading `/` is dropped). */
function segmentsOf(path: string): string[] {
  const normalized = path.replaceAll('\\', '/').replace(/^[a-zA-Z]:/, '');
  const segments = normalized.split('/').filter((segment) => segment !== '' && segment !== '.');
  if (segments.length === 0) throw invalidRequest('every uploaded file needs a file name');
  if (segments.some((segment) => segment === '..')) {
    throw invalidRequest(`file path ${JSON.stringify(path)} must not contain ".."`);
  }
  if (segments.some((segment) => segment.includes('\0'))) {
    throw invalidRequest(`file path ${JSON.stringify(path)} must not contain NUL`);
  }
  return segments;
}

/** Checks uploaded files (or one zip of them) and packs the skill. */
export function packageSkill(uploaded: readonly SkillFile[]): SkillPackage {
  let entries = [...uploaded];
  if (entries.length === 0) throw invalidRequest('files: upload at least SKILL.md');
  if (entries.length === 1 && entries[0]!.path.toLowerCase().endsWith('.zip')) {
    let unzipped: Unzipped;
    try {
      unzipped = unzipSync(entries[0]!.data);
    } catch {
      throw invalidRequest(`${entries[0]!.path} is not a readable zip archive`);
    }
    entries = Object.entries(unzipped)
      .filter(([path]) => !path.endsWith('/') && !path.startsWith('__MACOSX/'))
      .map(([path, data]) => ({ path, data }));
  }
  if (entries.length > MAX_SKILL_FILES) {
    throw invalidRequest(`a skill may hold at most ${MAX_SKILL_FILES} files, not ${entries.length}`);
  }
  const total = entries.reduce((sum, entry) => sum + entry.data.byteLength, 0);
  if (total > MAX_SKILL_BYTES) {
    throw invalidRequest(`a skill may hold at most ${MAX_SKILL_BYTES} bytes, not ${total}`);
  }
  const split = entries.map((entry) => ({ segments: segmentsOf(entry.path), data: entry.data }));
  // The skill's folder is where the shallowest SKILL.md is; every file must be inside it. (The
  // SDK sends file names with their paths, e.g. `skills/pdf/SKILL.md`, or base names only.)
  const skillFiles = split.filter((entry) => entry.segments.at(-1) === SKILL_FILE);
  const depth = Math.min(...skillFiles.map((entry) => entry.segments.length));
  const roots = skillFiles.filter((entry) => entry.segments.length === depth);
  if (roots.length === 0)
    throw invalidRequest(`no ${SKILL_FILE} in the upload; every skill needs one at its root`);
  if (roots.length > 1) {
    throw invalidRequest(
      `one skill per upload: found ${roots.map((entry) => entry.segments.join('/')).join(' and ')}`,
    );
  }
  const root = roots[0]!.segments.slice(0, -1);
  const folder = root.at(-1);
  const files = split.map((entry) => {
    if (
      root.some((segment, index) => entry.segments[index] !== segment) ||
      entry.segments.length <= root.length
    ) {
      throw invalidRequest(
        `${entry.segments.join('/')} is outside the skill's folder ${root.join('/')}/ (all files must be inside it)`,
      );
    }
    return { path: entry.segments.slice(root.length).join('/'), data: entry.data };
  });
  const seen = new Set<string>();
  for (const file of files) {
    if (seen.has(file.path)) throw invalidRequest(`file ${file.path} was uploaded twice`);
    seen.add(file.path);
  }
  const skillFile = files.find((file) => file.path === SKILL_FILE);
  if (!skillFile) throw invalidRequest(`no ${SKILL_FILE} at the root of the skill`);
  const instructions = new TextDecoder('utf-8', { fatal: false }).decode(skillFile.data);
  const problems: Problem[] = [];
  // The folder's name must equal the skill's name; files sent without a folder take the name.
  const declared = declaredSkillName(instructions) ?? '';
  const summary = readSkill(instructions, folder ?? declared, SKILL_FILE, problems);
  if (!summary || problems.length > 0) {
    const first = problems.sort((a, b) => (a.line ?? 0) - (b.line ?? 0));
    throw invalidRequest(
      `${folder ? `${folder}/` : ''}${SKILL_FILE}: ${first
        .map((problem) => `${problem.line ? `line ${problem.line}: ` : ''}${problem.message}`)
        .join('; ')}`,
    );
  }
  files.sort((a, b) =>
    a.path === SKILL_FILE ? -1 : b.path === SKILL_FILE ? 1 : a.path.localeCompare(b.path),
  );
  const archive = zipSync(
    Object.fromEntries(files.map((file) => [`${summary.name}/${file.path}`, file.data])),
    // A fixed time: the same files always give the same archive.
    { mtime: new Date('2000-01-01T00:00:00Z') },
  );
  return { name: summary.name, description: summary.description, instructions, files, archive };
}

/** The files of a stored skill archive, paths relative to the skill's folder. */
export function unpackSkill(archive: Uint8Array): SkillFile[] {
  return Object.entries(unzipSync(archive))
    .filter(([path]) => !path.endsWith('/'))
    .map(([path, data]) => ({ path: path.split('/').slice(1).join('/'), data }));
}
