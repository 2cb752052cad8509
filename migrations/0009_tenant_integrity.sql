-- 0009_tenant_integrity.sql — tenants cannot write the engine's columns, bypass admission or
-- billing, stall the fleet, or run unbounded work; the cascade is set-based; privileges are
-- explicit. (Issue 8; README "Security model" is the contract this file enforces.)
--
--  1. Engine columns belong to the engine. `authenticated` inserts tasks only with product
--     columns (column grants) and only as a fresh `pending` task (guard trigger), and updates
--     only descriptive columns afterwards. Members cancel and retry through the SECURITY
--     DEFINER functions bizq_cancel_task / bizq_retry_task, which run the same SQL bodies
--     (bizq_engine_cancel_task / bizq_engine_retry_task) as `bizq cancel` / `bizq retry`.
--  2. Set-based cascade. When a task fails or is cancelled, all its transitive dependents are
--     found by one recursive CTE and cancelled by one UPDATE, instead of one trigger level per
--     link (a 600-long chain overflowed the stack and failed every batch holding its head).
--  3. Privileges. Engine tables are revoked from anon/authenticated by name (TRUNCATE ignores
--     RLS); functions are no longer executable by PUBLIC by default; pgcrypto is revoked from
--     PUBLIC.
--  4. Tenants cannot stall claims: `authenticated` gets statement and idle-in-transaction
--     timeouts (the claim's SKIP LOCKED on workspace rows is in lifecycle.rs).
--  5. Limits, in the engine-only table bizq_limits: input size, depends_on length, and chain
--     depth and dependents of already-admitted dependencies are checked at insert; admission
--     checks chain depth and dependents again (dependencies inserted in the same batch).
--  6. Users can only bind their own auth identity; engine analytics events and customer
--     metrics are written by the engine's functions only.
--
-- Idempotent: CREATE OR REPLACE / IF NOT EXISTS / DROP ... IF EXISTS, REVOKE and GRANT.

-- ---------------------------------------------------------------------------------------------
-- Limits (engine-only settings). One row. Change with, as the engine or service_role:
--   UPDATE bizq_limits SET max_input_bytes = 4194304;
-- Not GUCs: a tenant session can SET any custom setting, so it could raise its own limits.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS bizq_limits (
  singleton       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
  -- octet_length(input::text) of a task, checked at insert.
  max_input_bytes INTEGER NOT NULL DEFAULT 1048576 CHECK (max_input_bytes > 0),
  -- cardinality(depends_on) of a task, checked at insert.
  max_depends_on  INTEGER NOT NULL DEFAULT 1000 CHECK (max_depends_on >= 0),
  -- longest chain of unfinished dependencies ending at a task, checked at admission (the
  -- cycle check walks at most this deep).
  max_chain_depth INTEGER NOT NULL DEFAULT 100 CHECK (max_chain_depth > 0),
  -- tasks admitted waiting on one task, checked at admission.
  max_dependents  INTEGER NOT NULL DEFAULT 10000 CHECK (max_dependents >= 0),
  updated_at      TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now()
);
INSERT INTO bizq_limits (singleton) VALUES (TRUE) ON CONFLICT (singleton) DO NOTHING;
ALTER TABLE bizq_limits ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON TABLE bizq_limits FROM PUBLIC, anon, authenticated;
GRANT SELECT, UPDATE ON TABLE bizq_limits TO service_role;

-- Engine bookkeeping columns added here: how deep the unfinished chain ending at a task is,
-- and how many tasks were admitted waiting on it (both written by admission only).
ALTER TABLE tasks
  ADD COLUMN IF NOT EXISTS chain_depth      INTEGER,
  ADD COLUMN IF NOT EXISTS dependents_count INTEGER NOT NULL DEFAULT 0;

-- ---------------------------------------------------------------------------------------------
-- 1. Column grants on tasks. Product columns only; everything the engine writes (status,
-- output, error_details, costs, reservations, leases, attempts, timing, dependency counters,
-- created_at, which orders admission and claims) is not grantable to `authenticated`.
-- ---------------------------------------------------------------------------------------------
REVOKE INSERT, UPDATE ON TABLE tasks FROM authenticated;
GRANT INSERT (id, workspace_id, type, category, name, description, priority, input, worker_type,
              ai_model, ai_provider, estimated_cost, created_by, assigned_to, parent_task_id,
              workflow_id, depends_on, blocks, scheduled_for, context, tags, quality_score,
              user_feedback, max_attempts)
  ON TABLE tasks TO authenticated;
-- After insert, only what describes the task to people (nothing admission checked).
GRANT UPDATE (name, description, priority, context, tags, quality_score, user_feedback,
              assigned_to, workflow_id, parent_task_id, updated_at)
  ON TABLE tasks TO authenticated;

-- Statement-level insert check, once per statement (no PL/pgSQL per row on the engine's hot
-- path): the limits for everyone, and for non-privileged sessions (any role that is not the
-- engine/owner, a superuser or BYPASSRLS, e.g. `authenticated` or a role that Supabase's
-- default grants reached) only fresh `pending` tasks with engine columns at their defaults.
CREATE OR REPLACE FUNCTION bizq_check_task_inserts()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  lim  bizq_limits%ROWTYPE;
  bad  record;
BEGIN
  SELECT l.singleton, l.max_input_bytes, l.max_depends_on, l.max_chain_depth, l.max_dependents,
         l.updated_at
    INTO lim
    FROM bizq_limits l;

  SELECT n.id, octet_length(n.input::text) AS bytes, cardinality(n.depends_on) AS deps
    INTO bad
    FROM inserted_tasks n
   WHERE octet_length(n.input::text) > lim.max_input_bytes
      OR cardinality(n.depends_on) > lim.max_depends_on
   LIMIT 1;
  IF FOUND THEN
    IF bad.bytes > lim.max_input_bytes THEN
      RAISE EXCEPTION 'task input is % bytes; the limit is % (bizq_limits.max_input_bytes)',
        bad.bytes, lim.max_input_bytes
        USING ERRCODE = 'program_limit_exceeded';
    END IF;
    RAISE EXCEPTION 'task depends on % tasks; the limit is % (bizq_limits.max_depends_on)',
      bad.deps, lim.max_depends_on
      USING ERRCODE = 'program_limit_exceeded';
  END IF;

  -- Chain depth and dependents, for dependencies that are already admitted and waiting
  -- (admission checks the rest, e.g. dependencies inserted in the same batch). One index
  -- probe per dependency (LATERAL ... OFFSET 0: no statistics on the transition table must
  -- turn this into a scan of tasks).
  SELECT d.dep, t.chain_depth
    INTO bad
    FROM inserted_tasks n
   CROSS JOIN LATERAL unnest(n.depends_on) AS d(dep)
   CROSS JOIN LATERAL (SELECT c.chain_depth
                         FROM tasks c
                        WHERE c.id = d.dep
                          AND c.status = 'pending'
                          AND c.deps_remaining > 0
                       OFFSET 0) t
   WHERE t.chain_depth >= lim.max_chain_depth
   LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'task % is already % dependencies deep; a task depending on it would exceed the limit of % (bizq_limits.max_chain_depth)',
      bad.dep, bad.chain_depth, lim.max_chain_depth
      USING ERRCODE = 'program_limit_exceeded';
  END IF;
  SELECT x.dep, x.dependents_count, x.new_dependents
    INTO bad
    FROM (SELECT d.dep, t.dependents_count, count(*) AS new_dependents
            FROM inserted_tasks n
           CROSS JOIN LATERAL unnest(n.depends_on) AS d(dep)
           CROSS JOIN LATERAL (SELECT c.dependents_count
                                 FROM tasks c
                                WHERE c.id = d.dep
                                  AND c.status IN ('pending', 'queued', 'processing', 'escalated')
                               OFFSET 0) t
           GROUP BY d.dep, t.dependents_count) x
   WHERE x.dependents_count + x.new_dependents > lim.max_dependents
   LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'task % already has % dependents; % more would exceed the limit of % (bizq_limits.max_dependents)',
      bad.dep, bad.dependents_count, bad.new_dependents, lim.max_dependents
      USING ERRCODE = 'program_limit_exceeded';
  END IF;

  RETURN NULL;
END;
$$;

-- The role a statement runs as, seen from inside a SECURITY DEFINER function (where
-- current_user is the definer): SET ROLE's value if one is set, else the session's user.
CREATE OR REPLACE FUNCTION bizq_calling_role()
RETURNS name
LANGUAGE sql
STABLE
SET search_path = public, pg_temp
AS $$
  SELECT CASE WHEN current_setting('role') IN ('', 'none') THEN session_user
              ELSE current_setting('role')::name END;
$$;

-- bizq_is_privileged_session() (0002) for a named role: superuser, BYPASSRLS (service_role),
-- or a member of the tables' owner (the engine).
CREATE OR REPLACE FUNCTION bizq_role_is_privileged(r name)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = public, pg_temp
AS $$
  SELECT coalesce((SELECT p.rolsuper OR p.rolbypassrls FROM pg_roles p WHERE p.rolname = r), false)
      OR pg_has_role(r, (SELECT c.relowner FROM pg_class c WHERE c.oid = 'public.workspaces'::regclass), 'MEMBER');
$$;

DROP TRIGGER IF EXISTS tasks_check_inserts ON tasks;
CREATE TRIGGER tasks_check_inserts
  AFTER INSERT ON tasks
  REFERENCING NEW TABLE AS inserted_tasks
  FOR EACH STATEMENT
  EXECUTE FUNCTION bizq_check_task_inserts();

-- What a non-privileged role may insert: fresh `pending` tasks with product columns only.
-- A BEFORE INSERT row trigger whose WHEN clause lets through only rows that set an engine
-- column, so a plain product insert runs no PL/pgSQL for it; the function then refuses any
-- role that is not the engine or service_role. It must run BEFORE any trigger that fills engine
-- columns itself (0012's tasks_queue_on_insert: same-kind triggers fire in name order, and
-- tasks_guard_... sorts first), so the engine's own decision is never read as the tenant's.
CREATE OR REPLACE FUNCTION bizq_guard_task_insert()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
  IF NOT bizq_role_is_privileged(bizq_calling_role()) THEN
    RAISE EXCEPTION 'tasks are inserted as pending with product columns only; status, costs, leases, attempts and dependency counters belong to the engine'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END;
$$;
REVOKE EXECUTE ON FUNCTION bizq_guard_task_insert() FROM PUBLIC, anon, authenticated;

DROP TRIGGER IF EXISTS tasks_guard_engine_columns_on_insert ON tasks;
CREATE TRIGGER tasks_guard_engine_columns_on_insert
  BEFORE INSERT ON tasks
  FOR EACH ROW
  WHEN (NEW.status <> 'pending'
        OR NEW.deps_remaining IS NOT NULL
        OR NEW.attempt <> 0
        OR NEW.reserved_credits <> 0
        OR NEW.has_dependents
        OR NEW.dependents_count <> 0
        OR NEW.chain_depth IS NOT NULL
        OR NEW.lease_token IS NOT NULL
        OR NEW.lease_expires_at IS NOT NULL
        OR NEW.locked_by IS NOT NULL
        OR NEW.wait_reason IS NOT NULL
        OR NEW.output IS NOT NULL
        OR NEW.error_details IS NOT NULL
        OR NEW.actual_cost IS NOT NULL
        OR NEW.cost_breakdown IS NOT NULL
        OR NEW.processing_time_ms IS NOT NULL
        OR NEW.started_at IS NOT NULL
        OR NEW.completed_at IS NOT NULL)
  EXECUTE FUNCTION bizq_guard_task_insert();

-- Updates: column grants stop `authenticated`; this covers any other non-privileged role that
-- holds UPDATE on tasks (as protect_workspace_billing does for workspaces). Once per
-- statement; privileged sessions (the engine, its SECURITY DEFINER functions and triggers,
-- service_role) return at once.
CREATE OR REPLACE FUNCTION bizq_protect_task_engine_columns()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
  IF bizq_is_privileged_session() THEN
    RETURN NULL;
  END IF;
  IF EXISTS (
       SELECT 1
         FROM guard_old o
         JOIN guard_new n ON n.id = o.id
        WHERE (o.status, o.deps_remaining, o.attempt, o.max_attempts, o.reserved_credits,
               o.has_dependents, o.dependents_count, o.chain_depth, o.lease_token,
               o.lease_expires_at, o.locked_by, o.wait_reason, o.output, o.error_details,
               o.actual_cost, o.estimated_cost, o.cost_breakdown, o.processing_time_ms,
               o.started_at, o.completed_at, o.created_at, o.type, o.input, o.depends_on,
               o.worker_type, o.scheduled_for, o.ai_provider, o.ai_model, o.workspace_id)
              IS DISTINCT FROM
              (n.status, n.deps_remaining, n.attempt, n.max_attempts, n.reserved_credits,
               n.has_dependents, n.dependents_count, n.chain_depth, n.lease_token,
               n.lease_expires_at, n.locked_by, n.wait_reason, n.output, n.error_details,
               n.actual_cost, n.estimated_cost, n.cost_breakdown, n.processing_time_ms,
               n.started_at, n.completed_at, n.created_at, n.type, n.input, n.depends_on,
               n.worker_type, n.scheduled_for, n.ai_provider, n.ai_model, n.workspace_id)) THEN
    RAISE EXCEPTION 'task status, costs, leases, attempts and admission inputs can only be changed by the engine (use bizq_cancel_task / bizq_retry_task)'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasks_protect_engine_columns ON tasks;
CREATE TRIGGER tasks_protect_engine_columns
  AFTER UPDATE ON tasks
  REFERENCING OLD TABLE AS guard_old NEW TABLE AS guard_new
  FOR EACH STATEMENT
  EXECUTE FUNCTION bizq_protect_task_engine_columns();

-- Deleting a task that is running (it holds a credit reservation) or that others wait for
-- (they would never be released) is the engine's business too.
CREATE OR REPLACE FUNCTION bizq_protect_task_delete()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
  IF NOT bizq_is_privileged_session() THEN
    RAISE EXCEPTION 'task % is % and cannot be deleted now; cancel it first (bizq_cancel_task)', OLD.id, OLD.status
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN OLD;
END;
$$;

DROP TRIGGER IF EXISTS tasks_protect_delete ON tasks;
CREATE TRIGGER tasks_protect_delete
  BEFORE DELETE ON tasks
  FOR EACH ROW
  WHEN (OLD.status IN ('queued', 'processing')
        OR (OLD.has_dependents AND OLD.status NOT IN ('completed', 'failed', 'cancelled')))
  EXECUTE FUNCTION bizq_protect_task_delete();

-- ---------------------------------------------------------------------------------------------
-- Cancel and retry: one SQL body each, for the CLI (lifecycle::cancel / retry, as the engine)
-- and for members (bizq_cancel_task / bizq_retry_task). The engine bodies do not check who
-- calls; they are not executable by tenants. They lock the task, and return the status it had
-- (NULL: no such task); if that status does not allow the action, nothing is changed and the
-- caller reports it.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION bizq_engine_cancel_task(p_task_id uuid, p_reason text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  prev text;
BEGIN
  SELECT t.status INTO prev FROM tasks t WHERE t.id = p_task_id FOR NO KEY UPDATE;
  IF NOT FOUND OR prev NOT IN ('pending', 'queued', 'processing', 'escalated') THEN
    RETURN prev;
  END IF;
  UPDATE tasks
     SET status = 'cancelled',
         completed_at = now(),
         wait_reason = NULL,
         lease_token = NULL,
         lease_expires_at = NULL,
         error_details = jsonb_build_object(
           'message', 'cancelled: ' || coalesce(p_reason, ''),
           'code', 'cancelled',
           'attempt', attempt,
           'previous_status', prev)
   WHERE id = p_task_id;
  IF prev = 'processing' THEN
    -- A hint to the worker holding it; its lease is void from this commit on.
    PERFORM pg_notify('bizq_cancel', p_task_id::text);
  END IF;
  RETURN prev;
END;
$$;

CREATE OR REPLACE FUNCTION bizq_engine_retry_task(p_task_id uuid)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  prev text;
BEGIN
  SELECT t.status INTO prev FROM tasks t WHERE t.id = p_task_id FOR NO KEY UPDATE;
  IF NOT FOUND OR prev NOT IN ('failed', 'cancelled', 'escalated') THEN
    RETURN prev;
  END IF;
  UPDATE tasks
     SET status = 'pending',
         attempt = 0,
         deps_remaining = NULL,
         chain_depth = NULL,
         wait_reason = NULL,
         scheduled_for = NULL,
         started_at = NULL,
         completed_at = NULL,
         output = NULL,
         error_details = NULL
   WHERE id = p_task_id;
  RETURN prev;
END;
$$;

-- Members: the same bodies, for tasks of their own workspace, owner/admin/member roles only.
-- A task the caller cannot write is "not found" (no existence oracle across tenants).
CREATE OR REPLACE FUNCTION bizq_member_task_check(p_task_id uuid)
RETURNS void
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = p_task_id AND user_can_write(t.workspace_id)) THEN
    RAISE EXCEPTION 'task % not found', p_task_id
      USING ERRCODE = 'no_data_found';
  END IF;
END;
$$;

CREATE OR REPLACE FUNCTION bizq_cancel_task(p_task_id uuid, p_reason text DEFAULT 'cancelled by a member')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  prev text;
BEGIN
  PERFORM bizq_member_task_check(p_task_id);
  prev := bizq_engine_cancel_task(p_task_id, p_reason);
  IF prev NOT IN ('pending', 'queued', 'processing', 'escalated') THEN
    RAISE EXCEPTION 'task % is %; cancel needs it to be one of: pending, queued, processing, escalated', p_task_id, prev
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  RETURN prev;
END;
$$;

CREATE OR REPLACE FUNCTION bizq_retry_task(p_task_id uuid)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  prev text;
BEGIN
  PERFORM bizq_member_task_check(p_task_id);
  prev := bizq_engine_retry_task(p_task_id);
  IF prev NOT IN ('failed', 'cancelled', 'escalated') THEN
    RAISE EXCEPTION 'task % is %; retry needs it to be one of: failed, cancelled, escalated', p_task_id, prev
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  RETURN prev;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 2. Set-based cascade (replaces 0006's bizq_resolve_dependents).
--   completed:  each waiting dependent has one dependency fewer (unchanged).
--   failed / cancelled, policy 'cancel': every transitive dependent still pending or queued is
--     found by ONE recursive CTE (task_dependencies edges, deduplicated by id), locked in id
--     order and cancelled by ONE UPDATE. error_details names the dependency that doomed each
--     one: the failed task for its direct dependents, a cancelled dependent for the others
--     (the same details as the old level-by-level cascade wrote).
--   policy 'escalate': direct dependents are escalated (unchanged; escalated is not terminal,
--     so the rest keep waiting on them).
-- The trigger fires only for status changes made by top-level statements (and SECURITY
-- DEFINER functions they call), pg_trigger_depth() = 0: the cascade's own UPDATE has already
-- resolved every dependent of the rows it cancels, so re-entering for each of them (100,000
-- index probes for a 100,000 chain, and the old stack overflow) is skipped.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION bizq_resolve_dependents()
RETURNS TRIGGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  policy TEXT := COALESCE(NULLIF(current_setting('bizq.dependency_failure_policy', true), ''), 'cancel');
  unblocked INTEGER;
  doomed UUID[];
BEGIN
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
  ELSIF policy = 'escalate' THEN
    UPDATE tasks t
       SET status = 'escalated',
           completed_at = NULL,
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
  ELSE
    -- The whole transitive set in one statement. Each step probes the edge index and the
    -- task's primary key (LATERAL ... OFFSET 0 keeps the planner from hash-joining whole
    -- tables once per level when statistics are missing, which made it quadratic).
    doomed := ARRAY(
      WITH RECURSIVE walk(id) AS (
          SELECT NEW.id
        UNION
          SELECT n.task_id
            FROM walk w
           CROSS JOIN LATERAL (SELECT d.task_id
                                 FROM task_dependencies d
                                WHERE d.depends_on_id = w.id
                               OFFSET 0) n
           CROSS JOIN LATERAL (SELECT c.status
                                 FROM tasks c
                                WHERE c.id = n.task_id
                               OFFSET 0) s
           WHERE s.status IN ('pending', 'queued')
      )
      SELECT w.id FROM walk w WHERE w.id <> NEW.id ORDER BY w.id);
    IF cardinality(doomed) = 0 THEN
      RETURN NULL;
    END IF;
    -- Locked in id order, like every multi-row lock of the engine.
    PERFORM 1 FROM tasks t WHERE t.id = ANY (doomed) ORDER BY t.id FOR NO KEY UPDATE;
    UPDATE tasks t
       SET status = 'cancelled',
           completed_at = now(),
           wait_reason = NULL,
           error_details = jsonb_build_object(
             'message', format('dependency %s %s', c.dep, CASE WHEN c.dep = NEW.id THEN NEW.status ELSE 'cancelled' END),
             'code', 'dependency_' || CASE WHEN c.dep = NEW.id THEN NEW.status ELSE 'cancelled' END,
             'dependency', c.dep,
             'dependency_status', CASE WHEN c.dep = NEW.id THEN NEW.status ELSE 'cancelled' END,
             'attempt', t.attempt)
      FROM (SELECT x.id,
                   -- The dependency that doomed it: the failed task itself if it is one,
                   -- else the first of its dependencies that is being cancelled with it.
                   (SELECT d.depends_on_id
                      FROM task_dependencies d
                     WHERE d.task_id = x.id
                       AND (d.depends_on_id = NEW.id
                            OR d.depends_on_id IN (SELECT u.id FROM unnest(doomed) AS u(id)))
                     ORDER BY (d.depends_on_id = NEW.id) DESC, d.depends_on_id
                     LIMIT 1) AS dep
              FROM unnest(doomed) AS x(id)) c
     WHERE t.id = c.id
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
        AND NEW.status IN ('completed', 'failed', 'cancelled')
        AND (NEW.status = 'completed' OR pg_trigger_depth() = 0))
  EXECUTE FUNCTION bizq_resolve_dependents();

-- ---------------------------------------------------------------------------------------------
-- 6. users: a tenant binds no auth identity but its own. Inviting a user leaves auth_user_id
-- NULL; the service (service_role) binds it when that person signs up. Otherwise an admin
-- could bind any unregistered auth id and own whoever later signs up with it.
-- (Replaces 0004's protect_user_privileges; the rest is unchanged.)
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION protect_user_privileges()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
  actor_role text;
  actor_workspace uuid;
BEGIN
  IF bizq_is_privileged_session() THEN
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
  END IF;

  actor_role := current_user_role();
  actor_workspace := current_user_workspace();

  IF TG_OP IN ('INSERT', 'UPDATE')
     AND NEW.auth_user_id IS NOT NULL
     AND NEW.auth_user_id IS DISTINCT FROM auth.uid()
     AND (TG_OP = 'INSERT' OR NEW.auth_user_id IS DISTINCT FROM OLD.auth_user_id) THEN
    RAISE EXCEPTION 'an account can only be linked to its own auth identity (leave auth_user_id NULL when inviting)'
      USING ERRCODE = 'insufficient_privilege';
  END IF;

  IF TG_OP = 'UPDATE' THEN
    IF NEW.role IS DISTINCT FROM OLD.role
       OR NEW.permissions IS DISTINCT FROM OLD.permissions
       OR NEW.workspace_id IS DISTINCT FROM OLD.workspace_id
       OR NEW.auth_user_id IS DISTINCT FROM OLD.auth_user_id THEN
      IF actor_workspace IS DISTINCT FROM OLD.workspace_id
         OR coalesce(actor_role, '') NOT IN ('owner', 'admin') THEN
        RAISE EXCEPTION 'only workspace owners and admins can change a user''s role, permissions or account link'
          USING ERRCODE = 'insufficient_privilege';
      END IF;
      IF actor_role = 'admin' AND (OLD.role = 'owner' OR NEW.role = 'owner') THEN
        RAISE EXCEPTION 'only workspace owners can grant or revoke the owner role'
          USING ERRCODE = 'insufficient_privilege';
      END IF;
    END IF;
    RETURN NEW;
  ELSIF TG_OP = 'INSERT' THEN
    IF actor_role = 'admin' AND NEW.role = 'owner' THEN
      RAISE EXCEPTION 'only workspace owners can grant or revoke the owner role'
        USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
  ELSE -- DELETE
    IF actor_role = 'admin' AND OLD.role = 'owner' THEN
      RAISE EXCEPTION 'only workspace owners can remove an owner'
        USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
  END IF;
END;
$$;

-- 6. Analytics events the engine writes (event_type 'system' or 'billing', event_name
-- 'low_credits', source 'billing') are written, changed and deleted only by the engine's
-- functions (deduct_task_credits runs as the owner) and service_role.
CREATE OR REPLACE FUNCTION bizq_protect_engine_events()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
  IF NOT bizq_is_privileged_session() THEN
    RAISE EXCEPTION 'system, billing and low_credits analytics events are written by the engine only'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$;

DROP TRIGGER IF EXISTS analytics_events_protect_engine_insert ON analytics_events;
CREATE TRIGGER analytics_events_protect_engine_insert
  BEFORE INSERT ON analytics_events
  FOR EACH ROW
  WHEN (NEW.event_type IN ('system', 'billing') OR NEW.event_name = 'low_credits'
        OR NEW.source = 'billing')
  EXECUTE FUNCTION bizq_protect_engine_events();

DROP TRIGGER IF EXISTS analytics_events_protect_engine_update ON analytics_events;
CREATE TRIGGER analytics_events_protect_engine_update
  BEFORE UPDATE ON analytics_events
  FOR EACH ROW
  WHEN (OLD.event_type IN ('system', 'billing') OR OLD.event_name = 'low_credits'
        OR OLD.source = 'billing'
        OR NEW.event_type IN ('system', 'billing') OR NEW.event_name = 'low_credits'
        OR NEW.source = 'billing')
  EXECUTE FUNCTION bizq_protect_engine_events();

DROP TRIGGER IF EXISTS analytics_events_protect_engine_delete ON analytics_events;
CREATE TRIGGER analytics_events_protect_engine_delete
  BEFORE DELETE ON analytics_events
  FOR EACH ROW
  WHEN (OLD.event_type IN ('system', 'billing') OR OLD.event_name = 'low_credits'
        OR OLD.source = 'billing')
  EXECUTE FUNCTION bizq_protect_engine_events();

-- 6. Customer metrics are derived from orders by recompute_customer_metrics (SECURITY
-- DEFINER): tenants insert and update every other column of customers.
REVOKE INSERT, UPDATE ON TABLE customers FROM authenticated;
DO $$
DECLARE
  cols text;
BEGIN
  SELECT string_agg(quote_ident(c.column_name), ', ' ORDER BY c.ordinal_position)
    INTO cols
    FROM information_schema.columns c
   WHERE c.table_schema = 'public'
     AND c.table_name = 'customers'
     AND c.column_name NOT IN ('total_orders', 'total_spent', 'average_order_value',
                               'lifetime_value', 'first_order_at', 'last_order_at');
  EXECUTE format('GRANT INSERT (%s), UPDATE (%s) ON TABLE customers TO authenticated', cols, cols);
END
$$;

CREATE OR REPLACE FUNCTION bizq_protect_customer_metrics()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
  IF NOT bizq_is_privileged_session() THEN
    RAISE EXCEPTION 'customer metrics (total_orders, total_spent, average_order_value, lifetime_value, first_order_at, last_order_at) are computed from orders'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS customers_protect_metrics_insert ON customers;
CREATE TRIGGER customers_protect_metrics_insert
  BEFORE INSERT ON customers
  FOR EACH ROW
  WHEN (NEW.total_orders <> 0 OR NEW.total_spent <> 0 OR NEW.average_order_value <> 0
        OR NEW.lifetime_value <> 0 OR NEW.first_order_at IS NOT NULL OR NEW.last_order_at IS NOT NULL)
  EXECUTE FUNCTION bizq_protect_customer_metrics();

DROP TRIGGER IF EXISTS customers_protect_metrics_update ON customers;
CREATE TRIGGER customers_protect_metrics_update
  BEFORE UPDATE ON customers
  FOR EACH ROW
  WHEN ((NEW.total_orders, NEW.total_spent, NEW.average_order_value, NEW.lifetime_value,
         NEW.first_order_at, NEW.last_order_at)
        IS DISTINCT FROM
        (OLD.total_orders, OLD.total_spent, OLD.average_order_value, OLD.lifetime_value,
         OLD.first_order_at, OLD.last_order_at))
  EXECUTE FUNCTION bizq_protect_customer_metrics();

-- ---------------------------------------------------------------------------------------------
-- 4. Tenant sessions cannot hold locks for long: statement and idle-in-transaction timeouts
-- for `authenticated` in this database (PostgREST/Supabase apply a role's settings when they
-- switch to it). Change with, e.g.:
--   ALTER ROLE authenticated IN DATABASE <db> SET statement_timeout = '10s';
-- Needs CREATEROLE or superuser; where the migrating role has neither, a notice says so and
-- the rest of the migration still applies.
-- ---------------------------------------------------------------------------------------------
DO $$
BEGIN
  EXECUTE format('ALTER ROLE authenticated IN DATABASE %I SET statement_timeout = %L', current_database(), '30s');
  EXECUTE format('ALTER ROLE authenticated IN DATABASE %I SET idle_in_transaction_session_timeout = %L', current_database(), '60s');
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'could not set timeouts for role authenticated: %', SQLERRM;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- 3. Privileges.
-- ---------------------------------------------------------------------------------------------
-- Engine tables: nothing for tenants, by name (Supabase's default privileges grant ALL on new
-- tables to anon and authenticated, and TRUNCATE ignores RLS).
REVOKE ALL ON TABLE task_dependencies, bizq_limits FROM PUBLIC, anon, authenticated;
-- The ten tables: no TRUNCATE, REFERENCES or TRIGGER for tenants, whatever defaults granted.
REVOKE TRUNCATE, REFERENCES, TRIGGER ON TABLE workspaces, users, tasks, stores, products,
  product_variants, customers, orders, content_projects, analytics_events FROM PUBLIC, anon, authenticated;

-- Functions created from now on by the migrating role are not executable by PUBLIC.
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- Existing functions of the public schema: none executable by PUBLIC; then exact grants.
-- (Trigger functions need no EXECUTE to fire.)
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN
    SELECT p.oid::regprocedure
      FROM pg_proc p
      JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = 'public'
       AND NOT EXISTS (SELECT 1 FROM pg_depend d
                        WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
  LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
  END LOOP;
END
$$;

-- pgcrypto (wherever it is installed): not for PUBLIC. The credential functions use it as
-- their owner. gen_random_uuid stays callable (column defaults use the core one anyway).
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN
    SELECT p.oid::regprocedure
      FROM pg_proc p
      JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
      JOIN pg_extension e ON e.oid = d.refobjid AND d.refclassid = 'pg_extension'::regclass
     WHERE e.extname = 'pgcrypto'
       AND p.proname <> 'gen_random_uuid'
  LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
  END LOOP;
END
$$;

-- What tenants call: the RLS helpers (0002), the CHECK helpers, cancel/retry.
GRANT EXECUTE ON FUNCTION current_user_workspace(), current_user_role(), user_has_role(text),
  user_can_access_workspace(uuid), user_can_write(uuid), user_is_workspace_admin(uuid),
  bizq_is_privileged_session(), is_valid_timezone(text), is_credentials_envelope(jsonb)
  TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION bizq_cancel_task(uuid, text), bizq_retry_task(uuid)
  TO authenticated, service_role;
-- The service may use the engine's bodies and helpers directly.
GRANT EXECUTE ON FUNCTION bizq_engine_cancel_task(uuid, text), bizq_engine_retry_task(uuid),
  bizq_calling_role(), bizq_role_is_privileged(name), bizq_member_task_check(uuid),
  store_credentials(uuid), recompute_customer_metrics(uuid), ensure_analytics_partitions(integer),
  bizq_month_start(text)
  TO service_role;

-- ---------------------------------------------------------------------------------------------
-- 7. Store credentials: the key never reaches a tenant session.
--   * The key lives in bizq_credentials_keyring, which only the engine and service_role can
--     read (`bizq credentials set-key` puts it there). Owners and admins write plaintext
--     credentials; the SECURITY DEFINER trigger encrypts them with that key. A tenant's
--     bizq.credentials_key setting is ignored, and pgcrypto is not executable by tenants, so
--     an owner cannot decrypt anything even with the key in hand.
--   * Until a key is stored, engine/service sessions may bring it in bizq.credentials_key, as
--     before; its fingerprint is recorded by the first use, and a session with another key
--     fails (a wrong key fails the write instead of writing something nobody can read).
--   * Envelope v2 binds the store and the key: {"enc": "pgp_sym", "v": 2, "kid": <key
--     fingerprint>, "data": pgp_sym_encrypt({"store": <id>, "credentials": <plaintext>})}.
--     An envelope copied to another store, or sealed under another key, is rejected on write
--     and on read. v1 envelopes (0004) are still read, never accepted on write.
--   * bizq_rotate_credentials_key re-encrypts every store in one statement (`bizq credentials
--     rotate`).
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS bizq_credentials_keyring (
  singleton   BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
  -- NULL: not stored; engine/service sessions bring it in bizq.credentials_key.
  key         TEXT,
  fingerprint TEXT NOT NULL,
  rotated_at  TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now()
);
ALTER TABLE bizq_credentials_keyring ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON TABLE bizq_credentials_keyring FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, UPDATE ON TABLE bizq_credentials_keyring TO service_role;

CREATE OR REPLACE FUNCTION bizq_key_fingerprint(k text)
RETURNS text
LANGUAGE sql
IMMUTABLE
SECURITY DEFINER
SET search_path = public, extensions, pg_temp
AS $$
  SELECT left(encode(digest('bizq.credentials_key:' || k, 'sha256'), 'hex'), 16);
$$;

CREATE OR REPLACE FUNCTION is_credentials_envelope(c jsonb)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
SET search_path = public, pg_temp
AS $$
  SELECT coalesce(
    jsonb_typeof(c) = 'object'
    AND c ->> 'enc' = 'pgp_sym'
    AND jsonb_typeof(c -> 'data') = 'string'
    AND ((c -> 'v' = '1'::jsonb AND (SELECT count(*) FROM jsonb_object_keys(c)) = 3)
         OR (c -> 'v' = '2'::jsonb AND jsonb_typeof(c -> 'kid') = 'string'
             AND (SELECT count(*) FROM jsonb_object_keys(c)) = 4)),
    false);
$$;

-- The key to use now (see above). Raises 55000 when there is none, 22023 for a wrong one;
-- messages never contain a key.
CREATE OR REPLACE FUNCTION bizq_credentials_key()
RETURNS text
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  ring_key text;
  ring_fp text;
  have_ring boolean;
  session_key text := nullif(current_setting('bizq.credentials_key', true), '');
BEGIN
  SELECT r.key, r.fingerprint INTO ring_key, ring_fp FROM bizq_credentials_keyring r;
  have_ring := FOUND;
  IF NOT bizq_role_is_privileged(bizq_calling_role()) THEN
    session_key := NULL; -- a tenant session never supplies the key
  END IF;
  IF session_key IS NOT NULL AND have_ring AND bizq_key_fingerprint(session_key) <> ring_fp THEN
    RAISE EXCEPTION 'the key in bizq.credentials_key is not the key the stored credentials are encrypted with'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF ring_key IS NOT NULL THEN
    RETURN ring_key;
  END IF;
  IF session_key IS NULL THEN
    RAISE EXCEPTION 'store credentials encryption key is not configured'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Store it with `bizq credentials set-key`, or set bizq.credentials_key in the engine''s or service''s session.';
  END IF;
  IF NOT have_ring THEN
    INSERT INTO bizq_credentials_keyring (singleton, key, fingerprint)
    VALUES (TRUE, NULL, bizq_key_fingerprint(session_key))
    ON CONFLICT (singleton) DO NOTHING;
  END IF;
  RETURN session_key;
END;
$$;

CREATE OR REPLACE FUNCTION bizq_seal_credentials(p_store uuid, p_plain jsonb, p_key text)
RETURNS jsonb
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = public, extensions, pg_temp
AS $$
  SELECT jsonb_build_object(
    'enc', 'pgp_sym',
    'v', 2,
    'kid', bizq_key_fingerprint(p_key),
    'data', encode(pgp_sym_encrypt(jsonb_build_object('store', p_store, 'credentials', p_plain)::text,
                                   p_key, 'cipher-algo=aes256'), 'base64'));
$$;

-- The plaintext of an envelope, checked to belong to p_store and to p_key.
CREATE OR REPLACE FUNCTION bizq_open_credentials(p_store uuid, p_envelope jsonb, p_key text)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = public, extensions, pg_temp
AS $$
DECLARE
  inner_doc jsonb;
BEGIN
  IF NOT is_credentials_envelope(p_envelope) THEN
    RAISE EXCEPTION 'credentials of store % are not an encryption envelope', p_store
      USING ERRCODE = 'data_corrupted';
  END IF;
  IF p_envelope -> 'v' = '2'::jsonb AND p_envelope ->> 'kid' <> bizq_key_fingerprint(p_key) THEN
    RAISE EXCEPTION 'credentials of store % are sealed under another key', p_store
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  BEGIN
    inner_doc := pgp_sym_decrypt(decode(p_envelope ->> 'data', 'base64'), p_key)::jsonb;
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'could not decrypt credentials of store %: wrong key or corrupt data', p_store
      USING ERRCODE = 'invalid_parameter_value';
  END;
  IF p_envelope -> 'v' = '1'::jsonb THEN
    RETURN inner_doc; -- legacy (0004): not bound to a store
  END IF;
  IF inner_doc ->> 'store' IS DISTINCT FROM p_store::text THEN
    RAISE EXCEPTION 'the credentials envelope of store % belongs to another store', p_store
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN inner_doc -> 'credentials';
END;
$$;

CREATE OR REPLACE FUNCTION encrypt_store_credentials()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, extensions, pg_temp
AS $$
DECLARE
  k text;
BEGIN
  IF TG_OP = 'UPDATE' AND NEW.id IS DISTINCT FROM OLD.id THEN
    RAISE EXCEPTION 'a store''s id cannot change (its credentials are bound to it)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF TG_OP = 'UPDATE' AND NEW.credentials IS NOT DISTINCT FROM OLD.credentials THEN
    RETURN NEW;
  END IF;
  -- The same rule as the stores policies, checked before any key is touched.
  IF NOT bizq_role_is_privileged(bizq_calling_role())
     AND NOT coalesce(user_is_workspace_admin(NEW.workspace_id), false) THEN
    RAISE EXCEPTION 'only workspace owners and admins write store credentials'
      USING ERRCODE = 'insufficient_privilege';
  END IF;

  k := bizq_credentials_key();

  IF is_credentials_envelope(NEW.credentials) THEN
    -- Only an envelope this database sealed for this very store under the current key.
    IF NEW.credentials -> 'v' <> '2'::jsonb THEN
      RAISE EXCEPTION 'stores.credentials envelope is not accepted; write the plaintext credentials'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM bizq_open_credentials(NEW.id, NEW.credentials, k);
    RETURN NEW;
  END IF;

  NEW.credentials := bizq_seal_credentials(NEW.id, NEW.credentials, k);
  RETURN NEW;
END;
$$;

-- Decrypts a store's credentials. service_role (and the engine) only. NULL for an unknown store.
CREATE OR REPLACE FUNCTION store_credentials(p_store_id uuid)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = public, extensions, pg_temp
AS $$
DECLARE
  c jsonb;
BEGIN
  SELECT s.credentials INTO c FROM stores s WHERE s.id = p_store_id;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  RETURN bizq_open_credentials(p_store_id, c, bizq_credentials_key());
END;
$$;

-- Stores the key in the keyring (it must match the fingerprint recorded so far, if any).
CREATE OR REPLACE FUNCTION bizq_set_credentials_key(p_key text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
  IF p_key IS NULL OR length(p_key) < 16 THEN
    RAISE EXCEPTION 'a credentials key has at least 16 characters'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO bizq_credentials_keyring (singleton, key, fingerprint)
  VALUES (TRUE, p_key, bizq_key_fingerprint(p_key))
  ON CONFLICT (singleton) DO UPDATE SET key = EXCLUDED.key
   WHERE bizq_credentials_keyring.fingerprint = EXCLUDED.fingerprint;
  IF NOT EXISTS (SELECT 1 FROM bizq_credentials_keyring r WHERE r.key IS NOT NULL) THEN
    RAISE EXCEPTION 'this is not the key the stored credentials are encrypted with; use bizq credentials rotate to change it'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
END;
$$;

-- Re-encrypts every store's credentials under p_new, in the caller's transaction (one
-- statement: all or nothing). The current key comes from bizq_credentials_key(). p_store_key:
-- keep the new key in the keyring (else engine/service sessions must bring it). Returns how
-- many stores were re-encrypted.
CREATE OR REPLACE FUNCTION bizq_rotate_credentials_key(p_new text, p_store_key boolean)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  old_key text := bizq_credentials_key();
  n integer;
BEGIN
  IF p_new IS NULL OR length(p_new) < 16 THEN
    RAISE EXCEPTION 'a credentials key has at least 16 characters'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM 1 FROM bizq_credentials_keyring FOR UPDATE;
  CREATE TEMP TABLE bizq_rotation ON COMMIT DROP AS
    SELECT s.id, bizq_open_credentials(s.id, s.credentials, old_key) AS plain
      FROM stores s
     ORDER BY s.id;
  UPDATE bizq_credentials_keyring
     SET key = CASE WHEN p_store_key THEN p_new END,
         fingerprint = bizq_key_fingerprint(p_new),
         rotated_at = now();
  -- This transaction's writes (the stores trigger) use the new key from here on.
  PERFORM set_config('bizq.credentials_key', p_new, true);
  UPDATE stores s
     SET credentials = bizq_seal_credentials(s.id, r.plain, p_new)
    FROM bizq_rotation r
   WHERE s.id = r.id;
  GET DIAGNOSTICS n = ROW_COUNT;
  DROP TABLE bizq_rotation;
  RETURN n;
END;
$$;

REVOKE EXECUTE ON FUNCTION bizq_key_fingerprint(text), bizq_credentials_key(),
  bizq_seal_credentials(uuid, jsonb, text), bizq_open_credentials(uuid, jsonb, text),
  store_credentials(uuid), bizq_set_credentials_key(text),
  bizq_rotate_credentials_key(text, boolean)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION bizq_credentials_key(), store_credentials(uuid),
  bizq_set_credentials_key(text), bizq_rotate_credentials_key(text, boolean)
  TO service_role;
