import type { Script } from './script.js';

/** File the demo script writes and reads back, relative to the sandbox working directory. */
export const DEMO_FILE_PATH = 'berth-demo.txt';

/** Command the demo script runs first. */
export const DEMO_BASH_COMMAND = 'echo "Hello from the Berth sandbox" && uname -s';

/**
 * `scripted/demo`: the offline demo. Runs bash, writes a file, reads it back, then
 * summarises. Every text says it comes from Berth's scripted model, so nobody mistakes it
 * for a real LLM.
 */
export const demoScript: Script = {
  name: 'demo',
  steps: [
    {
      reasoning: 'The user wants to see Berth at work. I will start by running a command in the sandbox.',
      text: "[Berth scripted demo model] Hi! I'm Berth's built-in scripted model, not a real LLM. First I'll run a command in the sandbox.",
      toolCalls: [{ toolName: 'bash', input: { command: DEMO_BASH_COMMAND } }],
    },
    {
      text: `[Berth scripted demo model] The sandbox answered. Now I'll write a file, ${DEMO_FILE_PATH}.`,
      toolCalls: [
        {
          toolName: 'write',
          input: {
            file_path: DEMO_FILE_PATH,
            content: "This file was written by Berth's scripted demo model inside the sandbox.\n",
          },
        },
      ],
    },
    {
      text: '[Berth scripted demo model] Reading the file back to check it.',
      toolCalls: [{ toolName: 'read', input: { file_path: DEMO_FILE_PATH } }],
    },
    {
      text: [
        "[Berth scripted demo model] Done. As Berth's scripted demo model I:",
        `1. ran \`${DEMO_BASH_COMMAND}\` in the sandbox,`,
        `2. wrote ${DEMO_FILE_PATH},`,
        '3. read it back:',
        '',
        '{{last_tool_result}}',
        '',
        'Every step is in the session event log. Give the agent a real model (for example anthropic/claude-sonnet-4-5) to talk to an LLM.',
      ].join('\n'),
    },
  ],
};

/** `scripted/echo`: replies with the text of the last user message, no tools. */
export const echoScript: Script = {
  name: 'echo',
  steps: [{ text: '{{last_user_message}}' }],
};

/** `scripted/bash-once`: runs the user message as one bash command, then replies with its output. */
export const bashOnceScript: Script = {
  name: 'bash-once',
  steps: [
    { toolCalls: [{ toolName: 'bash', input: { command: '{{last_user_message}}' } }] },
    { text: '{{last_tool_result}}' },
  ],
};

/**
 * `scripted/files-overview`: the `examples/file-helper` agent offline. Loads the agent's
 * `summarize-files` skill (progressive disclosure: the skill's body arrives only now), lists the
 * workspace, and replies with the listing.
 */
export const filesOverviewScript: Script = {
  name: 'files-overview',
  steps: [
    {
      text: "[Berth scripted model] I'll load the summarize-files skill first.",
      toolCalls: [{ toolName: 'skill', input: { name: 'summarize-files' } }],
    },
    {
      text: '[Berth scripted model] The skill says to list the folder with sizes first.',
      toolCalls: [{ toolName: 'bash', input: { command: 'ls -la /workspace' } }],
    },
    {
      text: [
        '[Berth scripted model] Here is the workspace, listed as the summarize-files skill asks:',
        '',
        '{{last_tool_result}}',
        '',
        'A real model (for example anthropic/claude-sonnet-4-5) would go on to read each file and write one line per file.',
      ].join('\n'),
    },
  ],
};

/** The scripts every registry knows, by name. */
export const builtInScripts: Readonly<Record<string, Script>> = {
  demo: demoScript,
  echo: echoScript,
  'bash-once': bashOnceScript,
  'files-overview': filesOverviewScript,
};
