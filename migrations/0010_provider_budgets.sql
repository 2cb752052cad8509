-- 0010_provider_budgets.sql — fleet-wide rate budgets and concurrency caps for AI providers,
-- kept in PostgreSQL so that every worker on every host draws from the same budget.
--
-- Why here and not in each worker: a provider's limits (requests, input tokens and output
-- tokens per minute; calls in flight) belong to the API key, not to a process. Budgets kept
-- per process let N replicas send N times the limit. The database is already the one thing
-- every worker talks to, so the budgets live in it and no extra service is needed.
--
-- provider_budgets: one token bucket per provider and dimension.
--   capacity       per minute; NULL = unlimited (the row still exists so that a 429 has a
--                  place to record blocked_until for every configured provider).
--   burst          the most the bucket holds. Much less than a minute's capacity: a bucket
--                  holding a full minute lets a fleet send a minute's worth in one second,
--                  and providers enforce their per-minute limits over shorter periods.
--   tokens         the level at refilled_at. It refills lazily, by capacity/60 per second up
--                  to burst, whenever a statement touches the row. It may be negative: a take
--                  may reserve capacity a moment ahead (the caller waits until its time), and
--                  a request larger than burst goes when the bucket is full and leaves it in
--                  debt. Either way the long-run rate stays at capacity.
--   blocked_until  set after a 429: nothing is taken from the provider before then.
--
-- provider_slots: the fleet-wide max_in_flight cap as one row per slot. A call holds a slot
-- (holder = a random token, like a task's lease_token) until it releases it or until
-- expires_at, so a crashed worker's slots come back on their own. Slots are taken with
-- SKIP LOCKED, so concurrent callers never queue on one hot counter row. No rows for a
-- provider = no cap.
--
-- Engine-only bookkeeping: row-level security on, no tenant policy, no tenant grants.
-- Idempotent: re-running this file changes nothing.

CREATE TABLE IF NOT EXISTS provider_budgets (
  provider      TEXT NOT NULL,
  dimension     TEXT NOT NULL,
  capacity      BIGINT,
  burst         DOUBLE PRECISION,
  tokens        DOUBLE PRECISION,
  refilled_at   TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
  blocked_until TIMESTAMP WITH TIME ZONE,
  PRIMARY KEY (provider, dimension),
  CONSTRAINT provider_budgets_dimension
    CHECK (dimension IN ('requests', 'input_tokens', 'output_tokens')),
  CONSTRAINT provider_budgets_bucket
    CHECK ((capacity IS NULL AND burst IS NULL AND tokens IS NULL)
           OR (capacity > 0 AND burst >= 1 AND burst <= capacity
               AND tokens IS NOT NULL AND tokens <= burst))
);

CREATE TABLE IF NOT EXISTS provider_slots (
  provider   TEXT NOT NULL,
  slot       INTEGER NOT NULL,
  holder     UUID,
  expires_at TIMESTAMP WITH TIME ZONE,
  PRIMARY KEY (provider, slot),
  CONSTRAINT provider_slots_slot CHECK (slot >= 0),
  CONSTRAINT provider_slots_held CHECK ((holder IS NULL) = (expires_at IS NULL))
);

ALTER TABLE provider_budgets ENABLE ROW LEVEL SECURITY;
ALTER TABLE provider_slots ENABLE ROW LEVEL SECURITY;
DO $$
BEGIN
  REVOKE ALL ON provider_budgets, provider_slots FROM PUBLIC;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
    REVOKE ALL ON provider_budgets, provider_slots FROM anon;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    REVOKE ALL ON provider_budgets, provider_slots FROM authenticated;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    GRANT ALL ON provider_budgets, provider_slots TO service_role;
  END IF;
END
$$;
