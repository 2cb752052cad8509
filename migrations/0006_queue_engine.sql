-- 0006_queue_engine.sql — what the task engine adds to the seed schema.
--
-- The seed's `tasks` table describes a task; it does not say how a fleet of workers on many
-- hosts shares it safely. This migration adds exactly that, and nothing product code must
-- know about:
--
--   attempt            attempts started so far (the claim increments it); retries and lease
--                      reclaims compare it with max_attempts.
--   max_attempts       per-task override; NULL means "the worker config's value for the type".
--   lease_token        a fresh random token per claim. Every write by a worker (heartbeat,
--                      complete, fail, release) is fenced on it, so a worker that lost its lease
--                      (killed, partitioned, too slow) can never write a late result.
--   lease_expires_at   the lease; the worker's heartbeat extends it, the scheduler reclaims
--                      tasks whose lease expired.
--   locked_by          which worker holds the lease (host:pid:uuid), for `bizq inspect`.
--   reserved_credits   credits reserved from the workspace when this attempt was claimed;
--                      released by trigger when the task leaves `processing`.
--   deps_remaining     NULL: not yet admitted by the scheduler (dependencies unchecked);
--                      0: ready; n > 0: waiting on n unfinished dependencies.
--   has_dependents     set when some task depends on this one, so the completion path pays
--                      for dependency bookkeeping only when there is any.
--   wait_reason        why a pending task is not moving (e.g. 'insufficient_credits'), shown
--                      to users; NULL when nothing holds it.
--
-- Everything is idempotent: re-running this file changes nothing.

ALTER TABLE tasks
  ADD COLUMN IF NOT EXISTS attempt          INTEGER NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS max_attempts     INTEGER,
  ADD COLUMN IF NOT EXISTS lease_token      UUID,
  ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMP WITH TIME ZONE,
  ADD COLUMN IF NOT EXISTS locked_by        TEXT,
  ADD COLUMN IF NOT EXISTS reserved_credits INTEGER NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS deps_remaining   INTEGER,
  ADD COLUMN IF NOT EXISTS has_dependents   BOOLEAN NOT NULL DEFAULT FALSE,
  ADD COLUMN IF NOT EXISTS wait_reason      TEXT;

-- Credits reserved by running tasks, and the start of the workspace's current billing month
-- (in its own timezone) so the scheduler can reset credits_used_this_month at the boundary.
ALTER TABLE workspaces
  ADD COLUMN IF NOT EXISTS credits_reserved    INTEGER NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS credits_month_start DATE NOT NULL DEFAULT (date_trunc('month', now() AT TIME ZONE 'UTC'))::date;

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'valid_attempt') THEN
    ALTER TABLE tasks ADD CONSTRAINT valid_attempt CHECK (attempt >= 0);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'valid_max_attempts') THEN
    ALTER TABLE tasks ADD CONSTRAINT valid_max_attempts CHECK (max_attempts IS NULL OR max_attempts > 0);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'valid_reserved_credits') THEN
    ALTER TABLE tasks ADD CONSTRAINT valid_reserved_credits CHECK (reserved_credits >= 0);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'valid_credits_reserved') THEN
    ALTER TABLE workspaces ADD CONSTRAINT valid_credits_reserved CHECK (credits_reserved >= 0);
  END IF;
END
$$;

-- Dependency edges of admitted tasks: `task_id` waits for `depends_on_id`. `tasks.depends_on`
-- stays the user-facing source of truth; this table exists so that "who waits for X" is an
-- index probe instead of a scan, and so that a task with 100,000 dependents does not need a
-- 100,000-element `blocks` array rewritten on every admission.
CREATE TABLE IF NOT EXISTS task_dependencies (
  task_id       UUID NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
  depends_on_id UUID NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
  PRIMARY KEY (task_id, depends_on_id)
);
CREATE INDEX IF NOT EXISTS idx_task_dependencies_depends_on ON task_dependencies (depends_on_id);
-- Internal bookkeeping of the engine: not exposed to tenants.
ALTER TABLE task_dependencies ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON task_dependencies FROM PUBLIC;
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    GRANT ALL ON task_dependencies TO service_role;
  END IF;
END
$$;

-- Queue indexes. All are partial: a completed task is in none of them, so millions of
-- finished rows cost the scheduler and the claim nothing.
--   admit:   new pending tasks whose dependencies were not checked yet, oldest first.
--   promote: admitted, unblocked pending tasks, by due time (NULL = due now), so the scan
--            stops at now() however many tasks are scheduled for later.
--   claim:   the claim's exact order (priority, then age) over queued tasks only; tasks
--            blocked on dependencies are pending, so they are not in it.
--   lease:   processing tasks by lease expiry, for the reclaim sweep.
--   credit_wait: tasks parked because their workspace could not pay (or is not in good
--            standing), by workspace.
CREATE INDEX IF NOT EXISTS idx_tasks_admit ON tasks (created_at)
  WHERE status = 'pending' AND deps_remaining IS NULL;
CREATE INDEX IF NOT EXISTS idx_tasks_promote ON tasks ((COALESCE(scheduled_for, '-infinity'::timestamptz)))
  WHERE status = 'pending' AND deps_remaining = 0 AND wait_reason IS NULL;
CREATE INDEX IF NOT EXISTS idx_tasks_claim ON tasks (priority, created_at)
  WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS idx_tasks_lease ON tasks (lease_expires_at)
  WHERE status = 'processing';
CREATE INDEX IF NOT EXISTS idx_tasks_credit_wait ON tasks (workspace_id)
  WHERE status = 'pending' AND wait_reason IS NOT NULL;

-- The queue table churns: vacuum it far more eagerly than the 20% default so dead tuples of
-- claimed and completed tasks are reclaimed before they slow the index scans.
ALTER TABLE tasks SET (
  autovacuum_vacuum_scale_factor = 0.01,
  autovacuum_vacuum_insert_scale_factor = 0.05,
  autovacuum_analyze_scale_factor = 0.02,
  autovacuum_vacuum_cost_limit = 2000
);

-- Wake the scheduler when tasks are inserted (a hint; the scheduler also polls). One
-- notification per statement, and PostgreSQL folds identical ones within a transaction.
CREATE OR REPLACE FUNCTION bizq_notify_pending()
RETURNS TRIGGER
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM pg_notify('bizq_pending', '');
  RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasks_notify_pending ON tasks;
CREATE TRIGGER tasks_notify_pending
  AFTER INSERT ON tasks
  FOR EACH STATEMENT EXECUTE FUNCTION bizq_notify_pending();

-- Release the credits reserved by an attempt when the task leaves `processing`, whatever the
-- path (completed, failed, retried, cancelled, reclaimed, released at shutdown, or an admin's
-- UPDATE by hand). The charge itself is deduct_task_credits' job. Statement-level, like the
-- charge: one update per workspace per statement, workspaces in id order.
CREATE OR REPLACE FUNCTION bizq_release_reservation()
RETURNS TRIGGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
  UPDATE workspaces w
     SET credits_reserved = GREATEST(w.credits_reserved - r.released, 0)
    FROM (SELECT o.workspace_id, SUM(o.reserved_credits)::integer AS released
            FROM released_old o
            JOIN released_new n ON n.id = o.id
           WHERE o.status = 'processing'
             AND n.status IS DISTINCT FROM 'processing'
             AND o.reserved_credits > 0
           GROUP BY o.workspace_id) r
   WHERE w.id = r.workspace_id;
  RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasks_release_reservation ON tasks;
CREATE TRIGGER tasks_release_reservation
  AFTER UPDATE ON tasks
  REFERENCING OLD TABLE AS released_old NEW TABLE AS released_new
  FOR EACH STATEMENT
  EXECUTE FUNCTION bizq_release_reservation();

-- Resolve the dependents of a task that reached a terminal state.
--   completed:           each dependent has one dependency fewer to wait for.
--   failed / cancelled:  dependents still waiting are cancelled (or escalated, when the
--                        engine's connection sets bizq.dependency_failure_policy = 'escalate'),
--                        with error_details naming the dependency. Their own dependents
--                        follow through this same trigger, so the cascade is transitive.
CREATE OR REPLACE FUNCTION bizq_resolve_dependents()
RETURNS TRIGGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  policy TEXT := COALESCE(NULLIF(current_setting('bizq.dependency_failure_policy', true), ''), 'cancel');
  unblocked INTEGER;
BEGIN
  -- Dependents are locked in id order, like every other multi-row lock of the engine, so two
  -- parents completing at once cannot deadlock over their shared children.
  IF NEW.status = 'completed' THEN
    UPDATE tasks t
       SET deps_remaining = t.deps_remaining - 1
     WHERE t.id IN (SELECT c.id
                      FROM tasks c
                      JOIN task_dependencies d ON d.task_id = c.id
                     WHERE d.depends_on_id = NEW.id
                       AND c.status = 'pending'
                       AND c.deps_remaining > 0
                     ORDER BY c.id
                       FOR NO KEY UPDATE OF c)
       AND t.status = 'pending'
       AND t.deps_remaining > 0;
    GET DIAGNOSTICS unblocked = ROW_COUNT;
    IF unblocked > 0 THEN
      PERFORM pg_notify('bizq_pending', '');
    END IF;
  ELSE
    UPDATE tasks t
       SET status = CASE WHEN policy = 'escalate' THEN 'escalated' ELSE 'cancelled' END,
           completed_at = CASE WHEN policy = 'escalate' THEN NULL ELSE now() END,
           wait_reason = NULL,
           error_details = jsonb_build_object(
             'message', format('dependency %s %s', NEW.id, NEW.status),
             'code', 'dependency_' || NEW.status,
             'dependency', NEW.id,
             'dependency_status', NEW.status,
             'attempt', t.attempt)
     WHERE t.id IN (SELECT c.id
                      FROM tasks c
                      JOIN task_dependencies d ON d.task_id = c.id
                     WHERE d.depends_on_id = NEW.id
                       AND c.status IN ('pending', 'queued')
                     ORDER BY c.id
                       FOR NO KEY UPDATE OF c)
       AND t.status IN ('pending', 'queued');
  END IF;
  RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasks_resolve_dependents ON tasks;
CREATE TRIGGER tasks_resolve_dependents
  AFTER UPDATE OF status ON tasks
  FOR EACH ROW
  WHEN (NEW.has_dependents
        AND NEW.status IS DISTINCT FROM OLD.status
        AND NEW.status IN ('completed', 'failed', 'cancelled'))
  EXECUTE FUNCTION bizq_resolve_dependents();

-- First day of the current month in a workspace's timezone; an unknown timezone name counts
-- as UTC instead of failing the whole housekeeping statement.
CREATE OR REPLACE FUNCTION bizq_month_start(tz TEXT)
RETURNS DATE
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
  RETURN (date_trunc('month', now() AT TIME ZONE COALESCE(tz, 'UTC')))::date;
EXCEPTION WHEN invalid_parameter_value THEN
  RETURN (date_trunc('month', now() AT TIME ZONE 'UTC'))::date;
END;
$$;
