import { describe, expect, it } from 'vitest';
import type { StoredEvent } from '../store/event-store.js';
import { decideNextStep } from './turn-state.js';

/** Builds a log from `[type, fields]` pairs; ids are `e<seq>`. */
function log(...entries: [string, Record<string, unknown>?][]): StoredEvent[] {
  return entries.map(([type, fields], index) => ({
    sessionId: 's',
    seq: index + 1,
    event: { id: `e${index + 1}`, type, processed_at: '2026-11-22T00:00:00.000Z', ...fields },
  }));
}

const message = ['user.message', { content: [{ type: 'text', text: 'hi' }] }] as [
  string,
  Record<string, unknown>,
];
const idle = ['session.status_idle', { stop_reason: { type: 'end_turn' } }] as [
  string,
  Record<string, unknown>,
];

describe('decideNextStep: what a wake does next, from the log alone', () => {
  it('does nothing for a new session or after the turn ended', () => {
    expect(decideNextStep([]).kind).toBe('none');
    expect(decideNextStep(log(message, ['session.status_running'], idle)).kind).toBe('none');
  });

  it('starts a turn when a user message arrived after the last idle', () => {
    expect(decideNextStep(log(message)).kind).toBe('start_turn');
    expect(decideNextStep(log(message, ['session.status_running'], idle, message)).kind).toBe('start_turn');
  });

  it('calls the model once the turn is running, and again after tool results', () => {
    expect(decideNextStep(log(message, ['session.status_running']))).toEqual({
      kind: 'call_model',
      failures: 0,
    });
    const afterTool = log(
      message,
      ['session.status_running'],
      ['span.model_request_start'],
      ['agent.tool_use', { name: 'bash', input: {} }],
      ['span.model_request_end', { is_error: false }],
      ['agent.tool_result', { tool_use_id: 'e4' }],
    );
    expect(decideNextStep(afterTool)).toEqual({ kind: 'call_model', failures: 0 });
  });

  it('retries a model request that started but never ended (the process died during the call)', () => {
    expect(decideNextStep(log(message, ['session.status_running'], ['span.model_request_start'])).kind).toBe(
      'call_model',
    );
  });

  it('runs tool uses that have no result yet, in order', () => {
    const step = decideNextStep(
      log(
        message,
        ['session.status_running'],
        ['span.model_request_start'],
        ['agent.tool_use', { name: 'bash', input: {} }],
        ['agent.tool_use', { name: 'read', input: {} }],
        ['span.model_request_end', { is_error: false }],
        ['agent.tool_result', { tool_use_id: 'e4' }],
      ),
    );
    expect(step.kind).toBe('run_tools');
    expect(step.kind === 'run_tools' && step.toolUses.map((toolUse) => toolUse.event.id)).toEqual(['e5']);
  });

  it('ends the turn after a model response without tool uses', () => {
    const step = decideNextStep(
      log(
        message,
        ['session.status_running'],
        ['span.model_request_start'],
        ['agent.message', { content: [] }],
        ['span.model_request_end', { is_error: false }],
      ),
    );
    expect(step.kind).toBe('end_turn');
  });

  it('counts failed model calls in a row so retries can run out', () => {
    const step = decideNextStep(
      log(
        message,
        ['session.status_running'],
        ['span.model_request_start'],
        ['span.model_request_end', { is_error: true }],
        ['span.model_request_start'],
        ['span.model_request_end', { is_error: true }],
      ),
    );
    expect(step).toEqual({ kind: 'call_model', failures: 2 });
  });

  it('waits for the client on custom tool uses, re-emits the wait for the rest after a partial answer, and resumes only when every result is in', () => {
    const waiting = log(
      message,
      ['session.status_running'],
      ['span.model_request_start'],
      ['agent.custom_tool_use', { name: 'lookup', input: {} }],
      ['agent.custom_tool_use', { name: 'lookup', input: {} }],
      ['span.model_request_end', { is_error: false }],
    );
    expect(decideNextStep(waiting)).toEqual({ kind: 'await_client', eventIds: ['e4', 'e5'] });
    const oneAnswered = [
      ...waiting,
      ...log(idle, ['user.custom_tool_result', { custom_tool_use_id: 'e4' }]).map((stored, index) => ({
        ...stored,
        seq: waiting.length + index + 1,
        event: { ...stored.event, id: `x${index}` },
      })),
    ];
    // An answer to some re-emits the idle with the rest; once it is written, nothing to do.
    expect(decideNextStep(oneAnswered)).toEqual({ kind: 'await_client', eventIds: ['e5'] });
    const reEmitted = [
      ...oneAnswered,
      { sessionId: 's', seq: 98, event: { id: 'x8', type: 'session.status_idle', processed_at: '' } },
    ];
    expect(decideNextStep(reEmitted).kind).toBe('none');
    const bothAnswered = [
      ...oneAnswered,
      {
        sessionId: 's',
        seq: 99,
        event: { id: 'x9', type: 'user.custom_tool_result', processed_at: '', custom_tool_use_id: 'e5' },
      },
    ];
    expect(decideNextStep(bothAnswered).kind).toBe('start_turn');
  });

  it('ends a running turn on interrupt, closing open tool uses, but ignores an interrupt sent while idle', () => {
    const interrupted = decideNextStep(
      log(
        message,
        ['session.status_running'],
        ['span.model_request_start'],
        ['agent.tool_use', { name: 'bash', input: {} }],
        ['span.model_request_end', { is_error: false }],
        ['user.interrupt'],
      ),
    );
    expect(interrupted.kind).toBe('interrupted');
    expect(
      interrupted.kind === 'interrupted' && interrupted.openToolUses.map((toolUse) => toolUse.event.id),
    ).toEqual(['e4']);
    expect(
      decideNextStep(log(message, ['session.status_running'], idle, ['user.interrupt'], message)).kind,
    ).toBe('start_turn');
  });

  it('calls the model again for a message that arrived while the last request was open', () => {
    const step = decideNextStep(
      log(
        message,
        ['session.status_running'],
        ['span.model_request_start'],
        message,
        ['agent.message', { content: [] }],
        ['span.model_request_end', { is_error: false }],
      ),
    );
    expect(step).toEqual({ kind: 'call_model', failures: 0 });
  });

  it('honours an interrupt that arrived before the turn started running', () => {
    expect(decideNextStep(log(message, ['user.interrupt']))).toEqual({
      kind: 'interrupted',
      openToolUses: [],
      restart: false,
    });
  });

  it('cancels an idle wait for custom tool results on interrupt', () => {
    const step = decideNextStep(
      log(
        message,
        ['session.status_running'],
        ['span.model_request_start'],
        ['agent.custom_tool_use', { name: 'lookup', input: {} }],
        ['span.model_request_end', { is_error: false }],
        ['session.status_idle', { stop_reason: { type: 'requires_action', event_ids: ['e4'] } }],
        ['user.interrupt'],
      ),
    );
    expect(step.kind).toBe('interrupted');
    expect(step.kind === 'interrupted' && step.openToolUses.map((toolUse) => toolUse.event.id)).toEqual([
      'e4',
    ]);
  });

  it('waits for confirmation of an always_ask tool use, then runs it if allowed or denies it', () => {
    const paused = log(
      message,
      ['session.status_running'],
      ['span.model_request_start'],
      ['agent.tool_use', { name: 'bash', input: {}, evaluated_permission: 'ask' }],
      ['span.model_request_end', { is_error: false }],
    );
    expect(decideNextStep(paused)).toEqual({ kind: 'await_client', eventIds: ['e4'] });
    const idleThenAllowed = [
      ...paused,
      ...log(idle, ['user.tool_confirmation', { tool_use_id: 'e4', result: 'allow' }]).map(
        (stored, index) => ({
          ...stored,
          seq: paused.length + index + 1,
          event: { ...stored.event, id: `c${index}` },
        }),
      ),
    ];
    expect(decideNextStep(idleThenAllowed).kind).toBe('start_turn');
    const resumed = [
      ...idleThenAllowed,
      { sessionId: 's', seq: 99, event: { id: 'r', type: 'session.status_running', processed_at: '' } },
    ];
    const run = decideNextStep(resumed);
    expect(run.kind === 'run_tools' && run.toolUses.map((toolUse) => toolUse.event.id)).toEqual(['e4']);
    const denied = resumed.map((stored) =>
      stored.event.type === 'user.tool_confirmation'
        ? { ...stored, event: { ...stored.event, result: 'deny', deny_message: 'no' } }
        : stored,
    );
    expect(decideNextStep(denied)).toMatchObject({ kind: 'deny_tool', message: 'no' });
  });

  it('redirects: an interrupt followed by a new message closes the turn and restarts with the message', () => {
    const step = decideNextStep(
      log(
        message,
        ['session.status_running'],
        ['span.model_request_start'],
        ['agent.tool_use', { name: 'bash', input: {} }],
        ['span.model_request_end', { is_error: false }],
        ['user.interrupt'],
        message,
      ),
    );
    expect(step).toMatchObject({ kind: 'interrupted', restart: true });
    expect(step.kind === 'interrupted' && step.openToolUses.map((toolUse) => toolUse.event.id)).toEqual([
      'e4',
    ]);
    // After the harness appended [result, idle, running], the next turn calls the model, and a
    // later interrupt still counts although the turn's message came before the idle.
    const restarted = log(
      message,
      ['session.status_running'],
      ['session.status_idle', { stop_reason: { type: 'end_turn' } }],
      ['session.status_running'],
    );
    expect(decideNextStep(restarted).kind).toBe('call_model');
    expect(
      decideNextStep([...restarted, ...log(['user.interrupt']).map((stored) => ({ ...stored, seq: 9 }))])
        .kind,
    ).toBe('interrupted');
  });

  it('an interrupt after an allow confirmation closes the confirmed tool use too', () => {
    const step = decideNextStep(
      log(
        message,
        ['session.status_running'],
        ['span.model_request_start'],
        ['agent.tool_use', { name: 'bash', input: {}, evaluated_permission: 'ask' }],
        ['span.model_request_end', { is_error: false }],
        ['session.status_idle', { stop_reason: { type: 'requires_action', event_ids: ['e4'] } }],
        ['user.tool_confirmation', { tool_use_id: 'e4', result: 'allow' }],
        ['user.interrupt'],
      ),
    );
    expect(step.kind === 'interrupted' && step.openToolUses.map((toolUse) => toolUse.event.id)).toEqual([
      'e4',
    ]);
  });

  it('gives up without retrying after a terminal model error', () => {
    const step = decideNextStep(
      log(
        message,
        ['session.status_running'],
        ['span.model_request_start'],
        [
          'session.error',
          { error: { type: 'model_request_failed_error', retry_status: { type: 'terminal' } } },
        ],
        ['span.model_request_end', { is_error: true }],
      ),
    );
    expect(step.kind).toBe('give_up');
  });
});
