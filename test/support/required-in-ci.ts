/**
 * What a suite needs from the host (a sandbox driver, PostgreSQL) in CI. Setup installs all of
 * it there (`scripts/setup --with-postgres --with-sandbox-drivers`), so a suite that finds a need
 * missing must fail the run naming it, not skip and leave CI green having tested nothing. Outside
 * CI a suite still skips, with the reason in its name.
 */

/** True in CI (`CI=true`), where nothing a suite needs may be missing. */
export const requiredInCi = process.env.CI === 'true';

/** The error a suite fails with in CI when `what` is missing (`reason` says why). */
export function missingInCi(what: string, reason: string): Error {
  return new Error(
    `CI=true, but ${what} is missing here: ${reason}. CI must test it: fix the setup ` +
      '(scripts/setup --with-postgres --with-sandbox-drivers) rather than skip.',
  );
}

/**
 * Whether a suite that needs `what` should skip: false when it is there (`reason` undefined),
 * true when it is missing outside CI. In CI a missing need throws `missingInCi` instead, which
 * fails the file (at collection) or the suite (in a hook).
 */
export function skipUnlessPresent(what: string, reason: string | undefined): boolean {
  if (reason === undefined) return false;
  if (requiredInCi) throw missingInCi(what, reason);
  return true;
}
