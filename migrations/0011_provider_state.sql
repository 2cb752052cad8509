-- 0011_provider_state.sql — providers parked fleet-wide.
--
-- A provider that answers 401/403 (bad or revoked key), 402 or a quota-exhausted 429 cannot
-- serve any task: retrying each task against it would burn every task's attempts on a
-- configuration fault. The worker that sees such an answer parks the provider here until
-- `parked_until` (config `providers.park_seconds`); the tasks wait as `pending` with
-- `wait_reason = 'provider_unavailable'` (and `error_details.provider` naming it) without
-- using an attempt, and the scheduler's `unpark_providers` lets them run again once the park
-- expires — the first of them is the probe. `bizq inspect` shows the wait; this table says why.
--
-- Engine-only bookkeeping: RLS on with no tenant policy, nothing granted to tenants.
-- `tasks.wait_reason` has no CHECK constraint (0006), so the new reason needs no change there.

CREATE TABLE IF NOT EXISTS provider_status (
  provider     TEXT PRIMARY KEY,
  parked_until TIMESTAMP WITH TIME ZONE NOT NULL,
  reason       TEXT NOT NULL,
  updated_at   TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now()
);

ALTER TABLE provider_status ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON TABLE provider_status FROM PUBLIC, anon, authenticated;
GRANT ALL ON TABLE provider_status TO service_role;
