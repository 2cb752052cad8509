-- 0012_lean_tasks.sql — a task's row is written three times (insert, claim, complete) instead
-- of four, and each write adds entries to a handful of indexes instead of 24.
--
-- Why: every update of a task changes `status`, an indexed column, so PostgreSQL cannot make it
-- a HOT update and adds an entry to every index of `tasks` whose predicate the new row meets.
-- With the seed's 17 general-purpose indexes (0003), the bare SQL of one task's life cost
-- about 230 us of PostgreSQL CPU (README, "the floor"), a ceiling under 10,000 tasks/s on two
-- cores before any engine work.
--
-- 1. Indexes (docs/schema.md has the table: seed index -> replacement -> the query it serves).
--    Every index left on `tasks` is named by the EXPLAIN of a shipped query, or backs a
--    constraint another table's foreign key needs (tests/tests/schema_indexes.rs, which also
--    fails when an index appears without such a test).
--    - Dropped, no shipped query uses them: status, type, category, priority_status,
--      created_at, scheduled_for (the promote index serves the due scan), workflow_id (no
--      workflows table, no foreign key), and the three GIN indexes on input/output/context
--      (no shipped query searches inside them).
--    - Replaced by idx_tasks_workspace_status_created (workspace_id, status, created_at)
--      INCLUDE (type, completed_at, processing_time_ms, actual_cost, quality_score):
--      workspace_id, workspace_status and pending. It serves the RLS policies (workspace_id =
--      the reader's workspace), the cascade of a workspace delete, `bizq list -w [-s]`
--      (newest first), `bizq stats` by status, and a workspace's workspace_dashboard and
--      task_performance rows as index-only scans.
--    - Made partial (WHERE col IS NOT NULL), so the usual NULL adds no entry: created_by,
--      assigned_to, parent_task_id. They serve the ON DELETE SET NULL of users and tasks.
--    - Kept: idx_tasks_workspace_completed_at (partial, completed rows): `bizq stats`'
--      completions of the last minute, per workspace; and the queue's own partial indexes
--      (0006).
--
-- 2. No write that decides nothing. A task that needs no scheduler decision is queued by its
--    own INSERT (tasks_queue_on_insert, BEFORE INSERT): status 'pending' as inserted, no
--    depends_on, not scheduled for later, not a human task, a type some worker registered in
--    `task_types` for the task's worker_type, and an estimated cost within the workspace's
--    ai_preferences.max_task_cost (or none). It gets exactly what admission would give it
--    (status 'queued', deps_remaining 0). Everything else stays 'pending' for the scheduler,
--    which still admits, promotes (scheduled, dependency-ready, retries), reclaims and unparks.
--    One statement-level trigger (tasks_notify_inserted) sends bizq_queued when the statement
--    queued a row and bizq_pending when it left one for admission, once per statement.
--
-- 3. `updated_at`: the engine's statements set it themselves (updated_at = now()), so the row
--    trigger's WHEN clause skips them without entering PL/pgSQL. The trigger still runs for any
--    update whose updated_at is not now() — every client update that leaves it alone or sets
--    another value — and sets now(), as before. What a client sees is unchanged.
--
-- 4. The billing triggers no longer keep a nested-loop plan made for an empty statement (see
--    section 4), and the reservation release returns at once when nothing leaves `processing`.
--
-- Idempotent: IF [NOT] EXISTS, CREATE OR REPLACE, ALTER FUNCTION ... SET, DROP TRIGGER IF
-- EXISTS + CREATE.

-- 1. Indexes ---------------------------------------------------------------------------------
DROP INDEX IF EXISTS idx_tasks_status;
DROP INDEX IF EXISTS idx_tasks_type;
DROP INDEX IF EXISTS idx_tasks_category;
DROP INDEX IF EXISTS idx_tasks_priority_status;
DROP INDEX IF EXISTS idx_tasks_created_at;
DROP INDEX IF EXISTS idx_tasks_scheduled_for;
DROP INDEX IF EXISTS idx_tasks_workflow_id;
DROP INDEX IF EXISTS idx_tasks_input_gin;
DROP INDEX IF EXISTS idx_tasks_output_gin;
DROP INDEX IF EXISTS idx_tasks_context_gin;

-- INCLUDE: the columns workspace_dashboard and task_performance aggregate, so a tenant's
-- dashboard is an index-only scan of its own entries instead of thousands of heap pages.
CREATE INDEX IF NOT EXISTS idx_tasks_workspace_status_created
  ON tasks (workspace_id, status, created_at)
  INCLUDE (type, completed_at, processing_time_ms, actual_cost, quality_score);
DROP INDEX IF EXISTS idx_tasks_workspace_id;
DROP INDEX IF EXISTS idx_tasks_workspace_status;
DROP INDEX IF EXISTS idx_tasks_pending;

-- Foreign-key support (ON DELETE SET NULL from users and from the parent task): partial.
DROP INDEX IF EXISTS idx_tasks_created_by;
DROP INDEX IF EXISTS idx_tasks_assigned_to;
DROP INDEX IF EXISTS idx_tasks_parent_task_id;
CREATE INDEX IF NOT EXISTS idx_tasks_created_by_set ON tasks (created_by)
  WHERE created_by IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_tasks_assigned_to_set ON tasks (assigned_to)
  WHERE assigned_to IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_tasks_parent_task_id_set ON tasks (parent_task_id)
  WHERE parent_task_id IS NOT NULL;

-- 2. Task types and queue-on-insert ------------------------------------------------------------
-- The types some worker serves, registered by each worker at start-up (worker_kind: the
-- tasks.worker_type it runs them as). A type nobody registered goes through admission, which
-- rejects it if the scheduler does not know it either. Engine bookkeeping, not for tenants.
CREATE TABLE IF NOT EXISTS task_types (
  type          TEXT PRIMARY KEY,
  worker_kind   TEXT NOT NULL DEFAULT 'ai'
                CHECK (worker_kind IN ('ai', 'human', 'integration', 'webhook')),
  -- TRUE when the registering workers price AI models ([models] in their config): a task of
  -- this type without an estimated_cost then goes through admission, which fills the estimate
  -- the claim's reservation and the max_task_cost escalation need (issue 9).
  estimate_at_admission BOOLEAN NOT NULL DEFAULT FALSE,
  registered_by TEXT,
  registered_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now()
);
ALTER TABLE task_types ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON task_types FROM PUBLIC;
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    GRANT ALL ON task_types TO service_role;
  END IF;
END
$$;

-- Runs only for rows the WHEN clause below lets through (pending, no dependency, due now, not
-- human, no deps_remaining set by hand); looks up what the clause cannot: the type's
-- registration and the workspace's max_task_cost (only when the task has an estimate).
-- SECURITY DEFINER: the inserting role may read neither task_types nor ai_preferences.
CREATE OR REPLACE FUNCTION bizq_queue_on_insert()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  max_cost jsonb;
BEGIN
  PERFORM 1
     FROM task_types tt
    WHERE tt.type = NEW.type
      AND tt.worker_kind = NEW.worker_type
      AND NOT (tt.estimate_at_admission AND NEW.estimated_cost IS NULL);
  IF NOT FOUND THEN
    RETURN NEW;
  END IF;
  IF NEW.estimated_cost IS NOT NULL THEN
    SELECT w.ai_preferences -> 'max_task_cost' INTO max_cost
      FROM workspaces w
     WHERE w.id = NEW.workspace_id;
    IF jsonb_typeof(max_cost) = 'number' AND NEW.estimated_cost > (max_cost #>> '{}')::float8 THEN
      RETURN NEW;
    END IF;
  END IF;
  NEW.status := 'queued';
  NEW.deps_remaining := 0;
  RETURN NEW;
END;
$$;
REVOKE EXECUTE ON FUNCTION bizq_queue_on_insert() FROM PUBLIC;

DROP TRIGGER IF EXISTS tasks_queue_on_insert ON tasks;
CREATE TRIGGER tasks_queue_on_insert
  BEFORE INSERT ON tasks
  FOR EACH ROW
  WHEN (NEW.status = 'pending'
        AND NEW.deps_remaining IS NULL
        AND cardinality(NEW.depends_on) = 0
        AND (NEW.scheduled_for IS NULL OR NEW.scheduled_for <= now())
        AND NEW.worker_type <> 'human')
  EXECUTE FUNCTION bizq_queue_on_insert();

-- Wake-ups for an INSERT: workers when it queued something, the scheduler when it left
-- something for admission. Replaces tasks_notify_pending (0006), which woke the scheduler for
-- every insert. Hints only; both sides also poll.
CREATE OR REPLACE FUNCTION bizq_notify_inserted()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM inserted_new n WHERE n.status = 'queued') THEN
    PERFORM pg_notify('bizq_queued', '');
  END IF;
  IF EXISTS (SELECT 1 FROM inserted_new n WHERE n.status = 'pending') THEN
    PERFORM pg_notify('bizq_pending', '');
  END IF;
  RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasks_notify_pending ON tasks;
DROP TRIGGER IF EXISTS tasks_notify_inserted ON tasks;
CREATE TRIGGER tasks_notify_inserted
  AFTER INSERT ON tasks
  REFERENCING NEW TABLE AS inserted_new
  FOR EACH STATEMENT
  EXECUTE FUNCTION bizq_notify_inserted();

-- 3. updated_at --------------------------------------------------------------------------------
-- Same function as 0004; it now runs only when the row's updated_at is not already now().
DROP TRIGGER IF EXISTS update_tasks_updated_at ON tasks;
CREATE TRIGGER update_tasks_updated_at
  BEFORE UPDATE ON tasks
  FOR EACH ROW
  WHEN (NEW.updated_at IS DISTINCT FROM now())
  EXECUTE FUNCTION update_updated_at_column();

-- 4. The billing triggers' plans -----------------------------------------------------------------
-- Both statement triggers join the statement's old and new transition tables on id. PL/pgSQL
-- plans such a query once per connection and keeps the plan; a query without parameters gets
-- a generic plan, built for the transition tables' sizes at that first call. A connection whose
-- first UPDATE of tasks touched no rows (an empty admission, say) keeps a nested loop, and a
-- later 20,000-row completion on it then took 15 s instead of 50 ms (measured: the bench's
-- floor). With nested loops off inside these two functions the join is a hash join whatever
-- the first call saw; their other statements are lookups by primary key.
ALTER FUNCTION deduct_task_credits() SET enable_nestloop = off;

-- The release, redefined (same semantics as 0007): it returns at once when the statement took
-- no reservation out of `processing` — every claim, admission, promotion and heartbeat, which
-- used to lock nothing and update nothing only after building both lists — and it writes each
-- workspace by primary key instead of joining workspaces (which, with nested loops off, would
-- be a scan).
CREATE OR REPLACE FUNCTION bizq_release_reservation()
RETURNS TRIGGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
SET enable_nestloop = off
AS $$
DECLARE
  r record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM released_old o WHERE o.status = 'processing' AND o.reserved_credits > 0) THEN
    RETURN NULL;
  END IF;
  -- The same lock as deduct_task_credits takes first (see 0007); a no-op when it already has.
  PERFORM bizq_lock_workspaces(ARRAY(
    SELECT n.workspace_id FROM released_new n WHERE n.status = 'completed'
    UNION
    SELECT o.workspace_id FROM released_old o WHERE o.status = 'processing' AND o.reserved_credits > 0));

  FOR r IN
    SELECT o.workspace_id, SUM(o.reserved_credits)::integer AS released
      FROM released_old o
      JOIN released_new n ON n.id = o.id
     WHERE o.status = 'processing'
       AND n.status IS DISTINCT FROM 'processing'
       AND o.reserved_credits > 0
     GROUP BY o.workspace_id
     ORDER BY o.workspace_id
  LOOP
    UPDATE workspaces
       SET credits_reserved = GREATEST(credits_reserved - r.released, 0)
     WHERE id = r.workspace_id;
  END LOOP;
  RETURN NULL;
END;
$$;

-- No tenant calls these (they are trigger functions); under Supabase's default privileges a
-- new function is executable by anon and authenticated, so revoke by name (as 0009 does).
REVOKE EXECUTE ON FUNCTION bizq_queue_on_insert() FROM PUBLIC, anon, authenticated;
REVOKE EXECUTE ON FUNCTION bizq_notify_inserted() FROM PUBLIC, anon, authenticated;
REVOKE EXECUTE ON FUNCTION bizq_release_reservation() FROM PUBLIC, anon, authenticated;
