-- 0013: the ops surface's own bookkeeping. Engine-only tables: RLS on with no tenant policy,
-- nothing granted to PUBLIC, anon or authenticated (service_role, which bypasses RLS, and the
-- engine's owner role use them). Idempotent when re-run by hand: IF NOT EXISTS, REVOKE and
-- GRANT only.
--
-- `workers`: every bizq-worker and bizq-scheduler registers one row at start-up and
-- heartbeats it; a clean shutdown deletes it. A row whose `last_seen_at` is older than the
-- lost-after window (`ops.worker_lost_after_seconds`) belongs to a process that died without
-- saying so (kill -9, lost host): `bizq workers` shows it as lost, and housekeeping deletes it
-- after `ops.worker_forget_after_seconds`. Nothing in the claim path reads this table.
CREATE TABLE IF NOT EXISTS workers (
  id            TEXT PRIMARY KEY,
  role          TEXT NOT NULL CONSTRAINT workers_role_check CHECK (role IN ('worker', 'scheduler')),
  host          TEXT NOT NULL,
  pid           INTEGER NOT NULL,
  version       TEXT NOT NULL,
  -- Task type patterns the worker claims (empty for a scheduler).
  types         TEXT[] NOT NULL DEFAULT '{}',
  concurrency   INTEGER NOT NULL DEFAULT 0,
  in_flight     INTEGER NOT NULL DEFAULT 0,
  -- 'running', or 'draining' once SIGTERM arrived and the process finishes its tasks.
  state         TEXT NOT NULL DEFAULT 'running'
                CONSTRAINT workers_state_check CHECK (state IN ('running', 'draining')),
  metrics_addr  TEXT,
  started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
  last_seen_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  last_claim_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS idx_workers_last_seen ON workers (last_seen_at);
ALTER TABLE workers ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON workers FROM PUBLIC;

-- `admin_events`: what an admin did from the dashboard (retry, cancel; single or bulk), by
-- whom, to which tasks. An action may span workspaces, so this is not `analytics_events`.
CREATE TABLE IF NOT EXISTS admin_events (
  id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at         TIMESTAMPTZ NOT NULL DEFAULT now(),
  actor      TEXT NOT NULL,
  action     TEXT NOT NULL,
  -- The filter of a bulk action, or the task id of a single one.
  target     JSONB NOT NULL DEFAULT '{}'::jsonb,
  task_ids   UUID[] NOT NULL DEFAULT '{}',
  -- Tasks the action applied to, and those it did not (wrong status by then), with why.
  done       INTEGER NOT NULL DEFAULT 0,
  skipped    JSONB NOT NULL DEFAULT '[]'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_admin_events_at ON admin_events (at DESC);
ALTER TABLE admin_events ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON admin_events FROM PUBLIC;

DO $$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      EXECUTE format('REVOKE ALL ON workers, admin_events FROM %I', r);
    END IF;
  END LOOP;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    GRANT ALL ON workers, admin_events TO service_role;
  END IF;
END
$$;
