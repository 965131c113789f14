import type { StoredEvent } from '../store/event-store.js';
import { contentText } from './context.js';

/** A tool as the selection sees it. */
export interface SelectableTool {
  name: string;
  description: string;
}

/** Agents with at most this many tools get all of them; above it, a selection. */
export const TOOL_SELECTION_THRESHOLD = 32;
/** How many tools a selection keeps (plus tools already used in the session). */
export const TOOL_SELECTION_SIZE = 12;

const wordPattern = /[a-z0-9]+/g;
const stopWords = new Set(
  'a an and are as at be by can do for from how i in is it me my of on or please the this to what with you'.split(
    ' ',
  ),
);

function words(text: string): string[] {
  // Split camelCase and snake_case names into words as well.
  return (
    text
      .replace(/([a-z])([A-Z])/g, '$1 $2')
      .toLowerCase()
      .match(wordPattern) ?? []
  );
}

/**
 * Tool search for agents with many tools: ranks tools lexically (BM25 over name and
 * description) against the session's recent user text and keeps the best few, plus every tool
 * the session already used, so the model's context carries only relevant definitions. Pure:
 * the same log gives the same selection, as the stateless harness requires.
 */
export function selectTools<T extends SelectableTool>(tools: readonly T[], log: readonly StoredEvent[]): T[] {
  if (tools.length <= TOOL_SELECTION_THRESHOLD) return [...tools];
  const used = new Set<string>();
  const queryParts: string[] = [];
  for (const { event } of log) {
    if (
      event.type === 'agent.tool_use' ||
      event.type === 'agent.custom_tool_use' ||
      event.type === 'agent.mcp_tool_use'
    ) {
      used.add(event.name as string);
    }
  }
  // The newest user messages say what the turn is about.
  for (let index = log.length - 1; index >= 0 && queryParts.length < 3; index--) {
    const event = log[index]!.event;
    if (event.type === 'user.message') queryParts.push(contentText(event.content));
  }
  const query = new Set(words(queryParts.join(' ')).filter((word) => !stopWords.has(word)));
  const documents = tools.map((tool) => words(`${tool.name} ${tool.name} ${tool.description}`));
  const averageLength = documents.reduce((sum, document) => sum + document.length, 0) / documents.length || 1;
  const documentFrequency = new Map<string, number>();
  for (const document of documents) {
    for (const word of new Set(document)) documentFrequency.set(word, (documentFrequency.get(word) ?? 0) + 1);
  }
  const scored = tools.map((tool, index) => {
    const document = documents[index]!;
    let score = 0;
    for (const term of query) {
      const frequency = document.filter((word) => word === term).length;
      if (frequency === 0) continue;
      const inverse = Math.log(
        1 +
          (tools.length - (documentFrequency.get(term) ?? 0) + 0.5) /
            ((documentFrequency.get(term) ?? 0) + 0.5),
      );
      score +=
        (inverse * frequency * 2.2) / (frequency + 1.2 * (0.25 + 0.75 * (document.length / averageLength)));
    }
    return { tool, index, score };
  });
  // Words that match nearly every tool say nothing about which one fits.
  const top = Math.max(0, ...scored.map((entry) => entry.score));
  const best = scored
    .filter((entry) => entry.score > 0 && entry.score >= top * 0.2 && !used.has(entry.tool.name))
    .sort((a, b) => b.score - a.score || a.index - b.index)
    .slice(0, TOOL_SELECTION_SIZE);
  const keep = new Set([...best.map((entry) => entry.tool.name), ...used]);
  return tools.filter((tool) => keep.has(tool.name));
}
