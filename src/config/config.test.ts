import { describe, expect, it } from 'vitest';
import { isBerthError } from '../errors.js';
import { loadConfig } from './config.js';

describe('config: egress settings', () => {
  it('reads BERTH_EGRESS_ALLOW_PRIVATE as exact address:port pairs', () => {
    const config = loadConfig({
      environment: { BERTH_EGRESS_ALLOW_PRIVATE: '127.0.0.1:8080, [0:0::1]:8443' },
    });
    expect(config.egress.allowPrivateDestinations).toEqual(['127.0.0.1:8080', '[::1]:8443']);
  });

  it('refuses an allow-list entry that is not an address and a port, naming it', () => {
    for (const entry of ['localhost:8080', '10.0.0.0/8', '127.0.0.1']) {
      let thrown: unknown;
      try {
        loadConfig({ environment: { BERTH_EGRESS_ALLOW_PRIVATE: entry } });
      } catch (error) {
        thrown = error;
      }
      expect(isBerthError(thrown, 'invalid_request'), entry).toBe(true);
      expect((thrown as Error).message).toContain(entry);
    }
  });
});

describe('config: cluster database', () => {
  it('refuses a BERTH_DATABASE_URL that --cluster would silently ignore, saying where each role goes', () => {
    const environment = { BERTH_DATABASE_URL: 'postgres://berth_app@db/berth' };
    let thrown: unknown;
    try {
      loadConfig({ flags: { cluster: 'postgres://berth_owner@db/berth' }, environment });
    } catch (error) {
      thrown = error;
    }
    expect(isBerthError(thrown, 'invalid_request')).toBe(true);
    expect((thrown as Error).message).toMatch(/BERTH_DATABASE_MIGRATION_URL/);
    // The same URL in both is fine.
    const config = loadConfig({ flags: { cluster: 'postgres://berth_app@db/berth' }, environment });
    expect(config.store).toMatchObject({ kind: 'postgres', url: 'postgres://berth_app@db/berth' });
  });
});
