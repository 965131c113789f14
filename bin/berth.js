#!/usr/bin/env node
// Runs the berth CLI from its TypeScript sources through tsx (no build step needed).
import { register } from 'tsx/esm/api';

register();
await import('../src/cli/main.ts');
