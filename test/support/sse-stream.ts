/** An SSE stream read with fetch: the text so far, and when the server ended it. */
export interface OpenStream {
  /** Resolves once `text` appears in the stream (or rejects after the timeout). */
  waitForText(text: string, timeoutMs?: number): Promise<void>;
  /** Resolves with the time the server ended the stream, or undefined if it did not within the timeout. */
  endedWithin(timeoutMs: number): Promise<number | undefined>;
  cancel(): Promise<void>;
}

/**
 * Opens `GET <url>` as an event stream with the key and reads it in the background; throws
 * unless the server answers 200.
 */
export async function openSseStream(url: string, key: string): Promise<OpenStream> {
  const response = await fetch(url, { headers: { 'x-api-key': key } });
  if (response.status !== 200) {
    throw new Error(`stream ${url} answered ${response.status}: ${await response.text()}`);
  }
  const reader = response.body!.getReader();
  const decoder = new TextDecoder();
  let text = '';
  let endedAt: number | undefined;
  let changed: () => void = () => undefined;
  const reading = (async () => {
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
        changed();
      }
      endedAt = Date.now();
    } catch {
      // Cancelled by the test.
    }
    changed();
  })();
  const until = async (condition: () => boolean, timeoutMs: number) => {
    const deadline = Date.now() + timeoutMs;
    while (!condition() && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        changed = resolve;
        setTimeout(resolve, Math.max(1, deadline - Date.now()));
      });
    }
    return condition();
  };
  return {
    async waitForText(wanted, timeoutMs = 5_000) {
      if (!(await until(() => text.includes(wanted), timeoutMs)))
        throw new Error(`stream never showed ${wanted}; got: ${text}`);
    },
    async endedWithin(timeoutMs) {
      await until(() => endedAt !== undefined, timeoutMs);
      return endedAt;
    },
    async cancel() {
      await reader.cancel().catch(() => undefined);
      await reading;
    },
  };
}
