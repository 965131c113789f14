import { readFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { sendAndWaitIdle } from './support/session-stream.js';

/** A raw HTTP request whose path is sent exactly as given (fetch would normalize `..`). */
function rawRequest(url: string, method: string, path: string, key: string, body?: Buffer) {
  return new Promise<{ status: number; body: Buffer }>((resolve, reject) => {
    const target = new URL(url);
    const request = httpRequest(
      { host: target.hostname, port: target.port, method, path, headers: { 'x-api-key': key } },
      (response) => {
        const chunks: Buffer[] = [];
        response.on('data', (chunk: Buffer) => chunks.push(chunk));
        response.on('end', () => resolve({ status: response.statusCode ?? 0, body: Buffer.concat(chunks) }));
      },
    );
    request.on('error', reject);
    request.end(body);
  });
}

/** The files API moves bytes in and out of a session's workspace, and never outside it. */
describe('session files', () => {
  let berth: TestBerth;
  let sessionId: string;
  const files = (path = '') => `/v1/sessions/${sessionId}/files${path}`;

  beforeAll(async () => {
    berth = await startTestBerth({ environment: { BERTH_MAX_BODY_BYTES: String(256 * 1024) } });
    const agent = await berth.client.beta.agents.create({
      name: 'files',
      model: 'scripted/bash-once',
      tools: [{ type: 'agent_toolset_20260401' }],
    });
    const environment = await berth.client.beta.environments.create({ name: 'files' });
    sessionId = (await berth.client.beta.sessions.create({ agent: agent.id, environment_id: environment.id }))
      .id;
  });
  afterAll(async () => berth?.dispose());

  it('uploads bytes the agent can read, downloads what the agent wrote, lists and deletes', async () => {
    const every = Buffer.from(Array.from({ length: 256 }, (_, index) => index));
    const upload = await rawRequest(berth.url, 'PUT', files('/data/all-bytes.bin'), berth.apiKey, every);
    expect(upload.status).toBe(200);
    expect(JSON.parse(upload.body.toString())).toEqual({
      type: 'file',
      path: 'data/all-bytes.bin',
      size_bytes: 256,
    });

    const seen = await sendAndWaitIdle(berth.client, sessionId, [
      {
        type: 'user.message',
        content: [{ type: 'text', text: 'wc -c < data/all-bytes.bin && printf "from the agent" > made.txt' }],
      },
    ]);
    const result = seen.find((event) => event.type === 'agent.tool_result');
    expect(JSON.stringify(result?.content)).toContain('256');

    const download = await rawRequest(berth.url, 'GET', files('/data/all-bytes.bin'), berth.apiKey);
    expect(download.status).toBe(200);
    expect(download.body.equals(every)).toBe(true);
    const made = await rawRequest(berth.url, 'GET', files('/made.txt'), berth.apiKey);
    expect(made.body.toString()).toBe('from the agent');

    const listed = JSON.parse(
      (await rawRequest(berth.url, 'GET', files(), berth.apiKey)).body.toString(),
    ) as {
      data: { path: string; size_bytes: number }[];
    };
    expect(listed.data.map((file) => [file.path, file.size_bytes])).toEqual([
      ['data/all-bytes.bin', 256],
      ['made.txt', 14],
    ]);

    expect((await rawRequest(berth.url, 'DELETE', files('/made.txt'), berth.apiKey)).status).toBe(200);
    expect((await rawRequest(berth.url, 'GET', files('/made.txt'), berth.apiKey)).status).toBe(404);
  });

  it('refuses paths that leave the workspace, and changes nothing', async () => {
    for (const path of [
      '/../../../etc/passwd',
      '/a/../../x',
      '/%2E%2E/%2E%2E/etc/passwd',
      '/..%2F..%2Fetc%2Fpasswd',
      '/%2Fetc%2Fpasswd',
      '/a//b',
      '/a%00b',
    ]) {
      for (const method of ['GET', 'PUT', 'DELETE']) {
        const answer = await rawRequest(berth.url, method, files(path), berth.apiKey, Buffer.from('x'));
        // 400 for a bad path; 404 when URL rules resolved the dots out of /files/ (no route). Never 2xx.
        expect([400, 404], `${method} ${path}: ${answer.body}`).toContain(answer.status);
      }
    }
    const listed = JSON.parse(
      (await rawRequest(berth.url, 'GET', files(), berth.apiKey)).body.toString(),
    ) as {
      data: { path: string }[];
    };
    expect(listed.data.map((file) => file.path)).toEqual(['data/all-bytes.bin']);
  });

  it('follows a symlink the agent made only inside the sandbox: no host file comes out', async () => {
    const adminKey = readFileSync(`${berth.dataDir}/admin.key`, 'utf8').trim();
    const hostShadow = readFileSync('/etc/shadow', 'utf8');
    await sendAndWaitIdle(berth.client, sessionId, [
      {
        type: 'user.message',
        content: [
          {
            type: 'text',
            text: `ln -s /etc/shadow shadow && ln -s ${berth.dataDir}/admin.key key && ln -s / root && echo linked`,
          },
        ],
      },
    ]);
    for (const path of ['/shadow', '/key', '/root/etc/shadow', `/root${berth.dataDir}/admin.key`]) {
      const answer = await rawRequest(berth.url, 'GET', files(path), berth.apiKey);
      expect(answer.status, path).not.toBe(200);
      expect(answer.body.toString()).not.toContain(adminKey);
      expect(answer.body.toString()).not.toContain(hostShadow.split('\n')[0]!);
    }
    // Writing through a symlink writes inside the sandbox's own view, never the host's file.
    const before = readFileSync('/etc/shadow', 'utf8');
    await rawRequest(berth.url, 'PUT', files('/shadow'), berth.apiKey, Buffer.from('owned'));
    expect(readFileSync('/etc/shadow', 'utf8')).toBe(before);
  });

  it('refuses an upload over the body limit with 413 and writes nothing', async () => {
    const big = Buffer.alloc(300 * 1024, 1);
    const answer = await rawRequest(berth.url, 'PUT', files('/big.bin'), berth.apiKey, big);
    expect(answer.status).toBe(413);
    expect((await rawRequest(berth.url, 'GET', files('/big.bin'), berth.apiKey)).status).toBe(404);
  });
});
