import { Hono } from 'hono';
import { z } from 'zod';
import { invalidRequest } from '../errors.js';
import { sessionOwnerFilter } from '../identity/access.js';
import { collectUsage } from '../metering/collect.js';
import { loadPriceBook, presetPriceBookIds } from '../metering/price-books.js';
import { buildUsageReport, formatUsageCsv, usageGroupKeys, usageReportToJson } from '../metering/report.js';
import type { ApiDependencies, ApiEnvironment } from './context.js';
import { describeZodError } from './errors.js';

const usageQuery = z.object({
  by: z.enum(usageGroupKeys).default('session'),
  since: z.iso.date().optional(),
  /** Preset ids only over the API (a path would read the server's files). */
  price_book: z.array(z.enum(presetPriceBookIds)).optional(),
  format: z.enum(['json', 'csv']).default('json'),
});

/**
 * `GET /v1/usage` (Berth): measured usage of the caller's sessions (admins: the tenant's),
 * grouped `by` tenant, agent, session or day, priced under one or more preset price books side
 * by side; `format=csv` for spreadsheets.
 */
export function usageRoutes(dependencies: ApiDependencies) {
  const app = new Hono<ApiEnvironment>();
  app.get('/', async (context) => {
    const principal = context.get('principal');
    const books = [
      ...(context.req.queries('price_book[]') ?? []),
      ...(context.req.queries('price_book') ?? []).flatMap((value) => value.split(',')),
    ].filter((value) => value !== '');
    const parsed = usageQuery.safeParse({
      by: context.req.query('by') || undefined,
      since: context.req.query('since') || undefined,
      price_book: books.length > 0 ? books : undefined,
      format: context.req.query('format') || undefined,
    });
    if (!parsed.success) throw invalidRequest(describeZodError(parsed.error));
    const query = parsed.data;
    const records = await collectUsage(dependencies.store, {
      tenantId: principal.tenantId,
      ownerId: sessionOwnerFilter(principal),
      since: query.since ? new Date(`${query.since}T00:00:00Z`) : undefined,
    });
    const report = buildUsageReport(records, {
      by: query.by,
      books: (query.price_book ?? [dependencies.budgetBook.id]).map((id) =>
        id === dependencies.budgetBook.id ? dependencies.budgetBook : loadPriceBook(id),
      ),
    });
    if (query.format === 'csv') {
      return context.body(formatUsageCsv(report), 200, {
        'content-type': 'text/csv; charset=utf-8',
        'content-disposition': `attachment; filename="berth-usage-by-${query.by}.csv"`,
      });
    }
    return context.json(usageReportToJson(report));
  });
  return app;
}
