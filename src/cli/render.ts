/**
 * Renders session events for a person reading a terminal: who said what, which tools ran
 * with what input, their (shortened) output, and how the turn ended.
 */
const useColor = process.stdout.isTTY && process.env.NO_COLOR === undefined;
const paint = (code: string) => (text: string) => (useColor ? `\u001b[${code}m${text}\u001b[0m` : text);
export const dim = paint('2');
const bold = paint('1');
const cyan = paint('36');
const green = paint('32');
const red = paint('31');
const yellow = paint('33');

interface EventLike {
  type: string;
  [field: string]: unknown;
}

function text(content: unknown): string {
  if (!Array.isArray(content)) return '';
  return content.map((block) => (block?.type === 'text' ? String(block.text) : `[${block?.type}]`)).join('');
}

function shorten(value: string, maxLines = 12): string {
  const lines = value.replace(/\s+$/, '').split('\n');
  if (lines.length <= maxLines) return lines.join('\n');
  return `${lines.slice(0, maxLines).join('\n')}\n… ${lines.length - maxLines} more lines`;
}

const indent = (value: string, prefix: string) =>
  value
    .split('\n')
    .map((line) => prefix + line)
    .join('\n');

function describeToolInput(name: string, input: Record<string, unknown>): string {
  if (name === 'bash' && typeof input.command === 'string') return `$ ${input.command}`;
  if (typeof input.file_path === 'string') return `${name} ${input.file_path}`;
  if (typeof input.pattern === 'string') return `${name} ${input.pattern}`;
  return `${name} ${JSON.stringify(input)}`;
}

/** One event as terminal lines, or undefined for events a person need not see. */
export function renderEvent(event: EventLike): string | undefined {
  switch (event.type) {
    case 'user.message':
      return `${bold(cyan('you'))}  ${text(event.content)}`;
    case 'agent.message':
      return `${bold(green('agent'))} ${text(event.content)}`;
    case 'agent.thinking':
      return dim('      (thinking)');
    case 'agent.tool_use':
    case 'agent.mcp_tool_use':
      return yellow(
        `  ▸ ${describeToolInput(String(event.name), (event.input ?? {}) as Record<string, unknown>)}`,
      );
    case 'agent.custom_tool_use':
      return yellow(
        `  ▸ custom tool ${String(event.name)} ${JSON.stringify(event.input)} (waiting for your client)`,
      );
    case 'agent.tool_result':
    case 'agent.mcp_tool_result': {
      const output = shorten(text(event.content));
      const body = indent(output || '(no output)', '    ');
      return event.is_error ? red(body) : dim(body);
    }
    case 'session.error': {
      const error = event.error as { message?: string; type?: string } | undefined;
      return red(`  ! ${error?.type ?? 'error'}: ${error?.message ?? ''}`);
    }
    case 'session.status_idle': {
      const reason = (event.stop_reason as { type?: string } | null)?.type ?? 'unknown';
      return dim(`  ● idle (${reason})`);
    }
    case 'session.status_terminated':
      return dim(
        event.reason === 'max_lifetime' ? '  ● terminated (max lifetime reached)' : '  ● terminated',
      );
    case 'berth.sandbox_stopped':
      return dim(`  ● sandbox stopped (${String(event.reason)}); the next tool call resumes it`);
    case 'berth.sandbox_resumed':
      return dim(`  ● sandbox resumed in ${String(event.duration_ms)} ms`);
    case 'user.interrupt':
      return dim('  ● interrupted');
    default:
      return undefined;
  }
}
