-- 0004_functions_triggers.sql — business-logic functions and triggers.
-- Idempotent: CREATE OR REPLACE FUNCTION; DROP TRIGGER IF EXISTS + CREATE TRIGGER.

-- ---------------------------------------------------------------------------------------------
-- updated_at maintenance
-- FIX: the seed attached the trigger to three tables and elided the rest ("..."); it is now on
-- every table that has an updated_at column (analytics_events has none).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION update_updated_at_column()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
  NEW.updated_at = NOW();
  RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS update_workspaces_updated_at ON workspaces;
CREATE TRIGGER update_workspaces_updated_at BEFORE UPDATE ON workspaces
  FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

DROP TRIGGER IF EXISTS update_users_updated_at ON users;
CREATE TRIGGER update_users_updated_at BEFORE UPDATE ON users
  FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

DROP TRIGGER IF EXISTS update_tasks_updated_at ON tasks;
CREATE TRIGGER update_tasks_updated_at BEFORE UPDATE ON tasks
  FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

DROP TRIGGER IF EXISTS update_stores_updated_at ON stores;
CREATE TRIGGER update_stores_updated_at BEFORE UPDATE ON stores
  FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

DROP TRIGGER IF EXISTS update_products_updated_at ON products;
CREATE TRIGGER update_products_updated_at BEFORE UPDATE ON products
  FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

DROP TRIGGER IF EXISTS update_product_variants_updated_at ON product_variants;
CREATE TRIGGER update_product_variants_updated_at BEFORE UPDATE ON product_variants
  FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

DROP TRIGGER IF EXISTS update_customers_updated_at ON customers;
CREATE TRIGGER update_customers_updated_at BEFORE UPDATE ON customers
  FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

DROP TRIGGER IF EXISTS update_orders_updated_at ON orders;
CREATE TRIGGER update_orders_updated_at BEFORE UPDATE ON orders
  FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

DROP TRIGGER IF EXISTS update_content_projects_updated_at ON content_projects;
CREATE TRIGGER update_content_projects_updated_at BEFORE UPDATE ON content_projects
  FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

-- ---------------------------------------------------------------------------------------------
-- tasks.completed_at
-- FIX (new): the dashboard counts "completed today" by completed_at; a task moved to
-- 'completed' without a completed_at would never be counted. Filled in only when missing.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION set_task_completed_at()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
  IF NEW.status = 'completed' AND NEW.completed_at IS NULL THEN
    NEW.completed_at := now();
  END IF;
  RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS set_task_completed_at_trigger ON tasks;
CREATE TRIGGER set_task_completed_at_trigger
  BEFORE INSERT OR UPDATE OF status ON tasks
  FOR EACH ROW EXECUTE FUNCTION set_task_completed_at();

-- ---------------------------------------------------------------------------------------------
-- Credit deduction
-- FIX: the seed subtracted the cost and *then* tested for a negative balance, but
-- valid_credits (credits_balance >= 0) rejects that UPDATE, so completing a task that cost more
-- than the balance raised and rolled back the task's completion. Now:
--   * charged once, on the transition into 'completed' (OLD.status IS DISTINCT FROM
--     'completed'; the seed's `OLD.status != 'completed'` is the same for non-NULL status, and
--     the trigger is now `UPDATE OF status` with a WHEN clause so other updates cost nothing);
--   * cost = COALESCE(actual_cost, estimated_cost, 0), never negative (CHECKs on tasks, and
--     GREATEST(..., 0) here as a second guard);
--   * balance clamped at 0; credits_used_this_month grows by exactly the cost; the part the
--     balance could not cover is added to workspaces.credits_overdrawn;
--   * the old balance is read under a row lock (FOR NO KEY UPDATE) in the same transaction as
--     the UPDATE, so concurrent completions serialise and are charged exactly;
--   * a 'low_credits' event is emitted when the balance CROSSES below 10% of
--     monthly_credit_limit (old >= threshold AND new < threshold): once per crossing, not for
--     every task completed while already low (the seed only fired below 0, which can't happen);
--   * SECURITY DEFINER: tasks are updated by roles (authenticated members, the worker) that may
--     not update workspaces' billing columns or insert analytics events.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION deduct_task_credits()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  r            record;
  old_balance  integer;
  new_balance  integer;
  credit_limit integer;
  threshold    numeric;
BEGIN
  -- One pass per workspace per statement (workspaces in id order, the engine's lock order):
  -- a worker completing 500 tasks of one workspace updates that workspace row once, not 500
  -- times. The statement's completions are charged together, so "once per crossing" holds per
  -- statement too: the balance crosses the threshold at most once in one UPDATE.
  FOR r IN
    SELECT n.workspace_id,
           SUM(GREATEST(COALESCE(n.actual_cost, n.estimated_cost, 0), 0))::integer AS cost,
           (array_agg(n.id ORDER BY COALESCE(n.actual_cost, n.estimated_cost, 0) DESC, n.id))[1] AS task_id
      FROM completed_new n
      JOIN completed_old o ON o.id = n.id
     WHERE n.status = 'completed'
       AND o.status IS DISTINCT FROM 'completed'
     GROUP BY n.workspace_id
    HAVING SUM(GREATEST(COALESCE(n.actual_cost, n.estimated_cost, 0), 0)) > 0
     ORDER BY n.workspace_id
  LOOP
    SELECT credits_balance INTO old_balance
    FROM workspaces WHERE id = r.workspace_id
    FOR NO KEY UPDATE;

    UPDATE workspaces SET
      credits_balance = GREATEST(credits_balance - r.cost, 0),
      credits_used_this_month = credits_used_this_month + r.cost,
      credits_overdrawn = credits_overdrawn + GREATEST(r.cost - credits_balance, 0)
    WHERE id = r.workspace_id
    RETURNING credits_balance, monthly_credit_limit INTO new_balance, credit_limit;

    threshold := credit_limit * 0.10;
    IF old_balance >= threshold AND new_balance < threshold THEN
      INSERT INTO analytics_events (workspace_id, event_type, event_name, source, task_id, properties)
      VALUES (r.workspace_id, 'system', 'low_credits', 'billing', r.task_id,
              jsonb_build_object(
                'credits_remaining', new_balance,
                'threshold', threshold,
                'monthly_credit_limit', credit_limit,
                'task_id', r.task_id,
                'task_cost', r.cost));
    END IF;
  END LOOP;

  RETURN NULL;
END;
$$;

-- FIX: statement-level with transition tables (PostgreSQL forbids a column list there, so it
-- fires for every UPDATE of tasks and filters on the status change itself). Row-level, it
-- updated the hot workspace row once per task, which was a third of the queue's cost.
DROP TRIGGER IF EXISTS deduct_task_credits_trigger ON tasks;
CREATE TRIGGER deduct_task_credits_trigger
  AFTER UPDATE ON tasks
  REFERENCING OLD TABLE AS completed_old NEW TABLE AS completed_new
  FOR EACH STATEMENT
  EXECUTE FUNCTION deduct_task_credits();

-- ---------------------------------------------------------------------------------------------
-- Billing fields are written only by privileged sessions (service_role, owner, superuser) and
-- the SECURITY DEFINER credit trigger. Column grants (0002) already stop `authenticated`; this
-- also covers any other role that was granted UPDATE on workspaces (e.g. via Supabase defaults).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION protect_workspace_billing()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
  IF (NEW.credits_balance IS DISTINCT FROM OLD.credits_balance
      OR NEW.credits_used_this_month IS DISTINCT FROM OLD.credits_used_this_month
      OR NEW.credits_overdrawn IS DISTINCT FROM OLD.credits_overdrawn
      OR NEW.monthly_credit_limit IS DISTINCT FROM OLD.monthly_credit_limit
      OR NEW.plan IS DISTINCT FROM OLD.plan
      OR NEW.subscription_status IS DISTINCT FROM OLD.subscription_status
      OR NEW.trial_ends_at IS DISTINCT FROM OLD.trial_ends_at)
     AND NOT bizq_is_privileged_session() THEN
    RAISE EXCEPTION 'workspace billing fields can only be changed by the billing service'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS protect_workspace_billing_trigger ON workspaces;
CREATE TRIGGER protect_workspace_billing_trigger
  BEFORE UPDATE ON workspaces
  FOR EACH ROW EXECUTE FUNCTION protect_workspace_billing();

-- ---------------------------------------------------------------------------------------------
-- users: only owners/admins change role, permissions, workspace or auth link; only owners
-- grant, revoke or delete the owner role. (RLS policies cannot compare OLD and NEW.)
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

DROP TRIGGER IF EXISTS protect_user_privileges_trigger ON users;
CREATE TRIGGER protect_user_privileges_trigger
  BEFORE INSERT OR UPDATE OR DELETE ON users
  FOR EACH ROW EXECUTE FUNCTION protect_user_privileges();

-- ---------------------------------------------------------------------------------------------
-- Customer metrics
-- FIX: the seed only recomputed NEW.customer_id: an order moved to another customer or deleted
-- left the old customer's totals stale (and DELETE did not fire at all); it took
-- last_order_at from cancelled/refunded orders while excluding them from the totals; it set
-- average_order_value in a second UPDATE (two writes, and a window where it disagreed with the
-- totals); it never set first_order_at or lifetime_value. Now one UPDATE per affected customer
-- (OLD and NEW, once if equal) computes everything from the same set of non-cancelled,
-- non-refunded orders; lifetime_value = total_spent (historical LTV; predicted_ltv is the
-- forward-looking figure). The customer row is locked first (FOR NO KEY UPDATE, which does not
-- conflict with the FK's KEY SHARE lock) and the aggregate is read by the next statement, so
-- concurrent order writes for one customer serialise and the last one sees all of them.
-- SECURITY DEFINER: metrics are derived data and must count every order of the customer.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION recompute_customer_metrics(p_customer_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
  IF p_customer_id IS NULL THEN
    RETURN;
  END IF;

  PERFORM 1 FROM customers WHERE id = p_customer_id FOR NO KEY UPDATE;

  UPDATE customers c SET
    total_orders = m.order_count,
    total_spent = m.spent,
    average_order_value = CASE WHEN m.order_count > 0 THEN round(m.spent / m.order_count, 2) ELSE 0 END,
    lifetime_value = m.spent,
    first_order_at = m.first_order,
    last_order_at = m.last_order
  FROM (
    SELECT count(*)::integer AS order_count,
           coalesce(sum(o.total_amount), 0) AS spent,
           min(o.order_date) AS first_order,
           max(o.order_date) AS last_order
    FROM orders o
    WHERE o.customer_id = p_customer_id
      AND o.status NOT IN ('cancelled', 'refunded')
  ) m
  WHERE c.id = p_customer_id;
END;
$$;

REVOKE EXECUTE ON FUNCTION recompute_customer_metrics(uuid) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION recompute_customer_metrics(uuid) TO service_role;

CREATE OR REPLACE FUNCTION update_customer_metrics()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') THEN
    PERFORM recompute_customer_metrics(OLD.customer_id);
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    IF TG_OP = 'INSERT' OR NEW.customer_id IS DISTINCT FROM OLD.customer_id THEN
      PERFORM recompute_customer_metrics(NEW.customer_id);
    END IF;
  END IF;
  RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS update_customer_metrics_trigger ON orders;
CREATE TRIGGER update_customer_metrics_trigger
  AFTER INSERT OR UPDATE OF customer_id, status, total_amount, order_date OR DELETE ON orders
  FOR EACH ROW EXECUTE FUNCTION update_customer_metrics();

-- ---------------------------------------------------------------------------------------------
-- Store credentials encryption
-- FIX: stores.credentials was documented as encrypted but stored as plain JSONB. The column is
-- unchanged (JSONB) but only ever holds an envelope
--   {"enc": "pgp_sym", "v": 1, "data": "<base64 of pgp_sym_encrypt(plaintext, key)>"}
-- with key = current_setting('bizq.credentials_key'), set per session by the services that
-- write or read credentials. Without a key nothing is written (never plaintext). Messages never
-- contain the key or the plaintext. search_path includes `extensions` because Supabase installs
-- pgcrypto there (a missing schema in search_path is ignored on plain PostgreSQL).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION is_credentials_envelope(c jsonb)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
SET search_path = public, pg_temp
AS $$
  SELECT coalesce(
    jsonb_typeof(c) = 'object'
    AND c ->> 'enc' = 'pgp_sym'
    AND c -> 'v' = '1'::jsonb
    AND jsonb_typeof(c -> 'data') = 'string'
    AND (SELECT count(*) FROM jsonb_object_keys(c)) = 3,
    false);
$$;

CREATE OR REPLACE FUNCTION bizq_credentials_key()
RETURNS text
LANGUAGE plpgsql
STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
  k text := current_setting('bizq.credentials_key', true);
BEGIN
  IF k IS NULL OR k = '' THEN
    RAISE EXCEPTION 'store credentials encryption key is not configured'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Set the bizq.credentials_key setting in this session before writing or reading stores.credentials.';
  END IF;
  RETURN k;
END;
$$;

-- Executable by everyone: it only reads the caller's own session setting; the store triggers
-- run as the caller (service_role, owners/admins) and need it.

CREATE OR REPLACE FUNCTION encrypt_store_credentials()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, extensions, pg_temp
AS $$
DECLARE
  k text;
BEGIN
  IF TG_OP = 'UPDATE' AND NEW.credentials IS NOT DISTINCT FROM OLD.credentials THEN
    RETURN NEW;
  END IF;

  k := bizq_credentials_key();

  IF is_credentials_envelope(NEW.credentials) THEN
    -- An envelope is accepted only if it really is ciphertext under our key; otherwise anyone
    -- could smuggle plaintext in as {"enc":"pgp_sym","v":1,"data":"<secret>"}.
    BEGIN
      PERFORM pgp_sym_decrypt(decode(NEW.credentials ->> 'data', 'base64'), k);
    EXCEPTION WHEN OTHERS THEN
      RAISE EXCEPTION 'stores.credentials envelope does not decrypt with the configured key'
        USING ERRCODE = 'invalid_parameter_value';
    END;
    RETURN NEW;
  END IF;

  NEW.credentials := jsonb_build_object(
    'enc', 'pgp_sym',
    'v', 1,
    'data', encode(pgp_sym_encrypt(NEW.credentials::text, k, 'cipher-algo=aes256'), 'base64'));
  RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS encrypt_store_credentials_trigger ON stores;
CREATE TRIGGER encrypt_store_credentials_trigger
  BEFORE INSERT OR UPDATE OF credentials ON stores
  FOR EACH ROW EXECUTE FUNCTION encrypt_store_credentials();

-- Decrypts a store's credentials. service_role only. Returns NULL for an unknown store.
CREATE OR REPLACE FUNCTION store_credentials(p_store_id uuid)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = public, extensions, pg_temp
AS $$
DECLARE
  c jsonb;
  k text;
BEGIN
  SELECT s.credentials INTO c FROM stores s WHERE s.id = p_store_id;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  k := bizq_credentials_key();
  IF NOT is_credentials_envelope(c) THEN
    RAISE EXCEPTION 'credentials of store % are not an encryption envelope', p_store_id
      USING ERRCODE = 'data_corrupted';
  END IF;
  BEGIN
    RETURN pgp_sym_decrypt(decode(c ->> 'data', 'base64'), k)::jsonb;
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'could not decrypt credentials of store %: wrong key or corrupt data', p_store_id
      USING ERRCODE = 'invalid_parameter_value';
  END;
END;
$$;

REVOKE EXECUTE ON FUNCTION store_credentials(uuid) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION store_credentials(uuid) TO service_role;
