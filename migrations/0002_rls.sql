-- 0002_rls.sql — roles, auth.* shims, RLS helper functions, privileges and policies.
--
-- Works on plain PostgreSQL 15 and on Supabase: everything Supabase already provides (roles,
-- the auth schema and auth.uid()/jwt()/role()) is created only when missing.
-- Idempotent: the whole file can be re-run by hand.

-- ---------------------------------------------------------------------------------------------
-- Roles (cluster-global). Many test databases are migrated concurrently in one cluster, so a
-- pg_roles check is not enough: the loser of a race gets duplicate_object/unique_violation,
-- which is swallowed. Existing roles are never ALTERed (Supabase owns its own).
-- ---------------------------------------------------------------------------------------------
DO $$
DECLARE
  spec text[];
BEGIN
  FOREACH spec SLICE 1 IN ARRAY ARRAY[
    ARRAY['anon', 'NOLOGIN NOINHERIT'],
    ARRAY['authenticated', 'NOLOGIN NOINHERIT'],
    ARRAY['service_role', 'NOLOGIN NOINHERIT BYPASSRLS']
  ] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = spec[1]) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I %s', spec[1], spec[2]);
      EXCEPTION WHEN duplicate_object OR unique_violation THEN
        NULL; -- created concurrently by another migration: fine
      END;
    END IF;
  END LOOP;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- auth schema and Supabase-compatible auth.uid() / auth.jwt() / auth.role()
-- FIX: the seed's policies call auth.uid(), which only exists on Supabase.
-- ---------------------------------------------------------------------------------------------
CREATE SCHEMA IF NOT EXISTS auth;

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = 'auth' AND p.proname = 'uid') THEN
    CREATE FUNCTION auth.uid() RETURNS uuid
    LANGUAGE sql STABLE
    AS $f$
      SELECT coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
      )::uuid
    $f$;
  END IF;

  IF NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = 'auth' AND p.proname = 'jwt') THEN
    CREATE FUNCTION auth.jwt() RETURNS jsonb
    LANGUAGE sql STABLE
    AS $f$
      SELECT coalesce(
        nullif(current_setting('request.jwt.claim', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')
      )::jsonb
    $f$;
  END IF;

  IF NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = 'auth' AND p.proname = 'role') THEN
    CREATE FUNCTION auth.role() RETURNS text
    LANGUAGE sql STABLE
    AS $f$
      SELECT coalesce(
        nullif(current_setting('request.jwt.claim.role', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'
      )::text
    $f$;
  END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION auth.uid(), auth.jwt(), auth.role() TO anon, authenticated, service_role;

-- ---------------------------------------------------------------------------------------------
-- RLS helper functions.
-- FIX: all are STABLE SECURITY DEFINER with a pinned search_path. SECURITY DEFINER lets them
-- read `users` without recursing into users' own policies; the pinned search_path stops a
-- caller from shadowing `users` with a temp/other-schema table (classic definer hijack).
-- current_user_workspace(): the seed's `LIMIT 1` hid a possible ambiguity; there is none,
-- because users.auth_user_id is UNIQUE (one auth identity = one workspace membership), so the
-- LIMIT is dropped.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION current_user_workspace()
RETURNS uuid
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
  SELECT workspace_id FROM users WHERE auth_user_id = auth.uid();
$$;

CREATE OR REPLACE FUNCTION current_user_role()
RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
  SELECT role FROM users WHERE auth_user_id = auth.uid();
$$;

CREATE OR REPLACE FUNCTION user_has_role(required_role text)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
  SELECT EXISTS (
    SELECT 1 FROM users
    WHERE auth_user_id = auth.uid()
      AND role = required_role
  );
$$;

CREATE OR REPLACE FUNCTION user_can_access_workspace(target_workspace_id uuid)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
  SELECT EXISTS (
    SELECT 1 FROM users
    WHERE auth_user_id = auth.uid()
      AND workspace_id = target_workspace_id
  );
$$;

-- owner/admin/member may write workspace data; viewers only read.
CREATE OR REPLACE FUNCTION user_can_write(target_workspace_id uuid)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
  SELECT EXISTS (
    SELECT 1 FROM users
    WHERE auth_user_id = auth.uid()
      AND workspace_id = target_workspace_id
      AND role IN ('owner', 'admin', 'member')
  );
$$;

-- owner/admin: manage users, stores (credentials) and workspace settings.
CREATE OR REPLACE FUNCTION user_is_workspace_admin(target_workspace_id uuid)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
  SELECT EXISTS (
    SELECT 1 FROM users
    WHERE auth_user_id = auth.uid()
      AND workspace_id = target_workspace_id
      AND role IN ('owner', 'admin')
  );
$$;

-- True for sessions that are not subject to RLS (superuser, BYPASSRLS roles such as
-- service_role, or the tables' owner, e.g. inside SECURITY DEFINER trigger functions).
-- Deliberately SECURITY INVOKER: it must see the caller's current_user.
CREATE OR REPLACE FUNCTION bizq_is_privileged_session()
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
  SELECT coalesce((SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.rolname = current_user), false)
      OR pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = 'public.workspaces'::regclass), 'MEMBER');
$$;

GRANT EXECUTE ON FUNCTION current_user_workspace(), current_user_role(), user_has_role(text),
  user_can_access_workspace(uuid), user_can_write(uuid), user_is_workspace_admin(uuid),
  bizq_is_privileged_session()
  TO anon, authenticated, service_role;

-- ensure_analytics_partitions (0001) creates tables: scheduler / service_role only.
REVOKE EXECUTE ON FUNCTION ensure_analytics_partitions(integer) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION ensure_analytics_partitions(integer) TO service_role;

-- ---------------------------------------------------------------------------------------------
-- Table privileges. Start from nothing (on Supabase, default privileges grant ALL on new tables
-- to anon/authenticated, which would defeat the column-level grants below), then grant exactly.
-- ---------------------------------------------------------------------------------------------
REVOKE ALL ON TABLE workspaces, users, tasks, stores, products, product_variants, customers,
  orders, content_projects, analytics_events FROM PUBLIC, anon, authenticated;

-- Partitions are only reachable through the parent (see ensure_analytics_partitions).
DO $$
DECLARE
  part regclass;
BEGIN
  FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'public.analytics_events'::regclass LOOP
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', part);
    EXECUTE format('REVOKE ALL ON TABLE %s FROM PUBLIC, anon, authenticated', part);
  END LOOP;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE users, tasks, stores, products, product_variants,
  customers, orders, content_projects, analytics_events TO authenticated;

-- FIX: workspaces — members read; owners/admins may update only the settings columns. Billing
-- fields (credits_balance, credits_used_this_month, credits_overdrawn, monthly_credit_limit,
-- plan, subscription_status, trial_ends_at) are not grantable to authenticated at all; they
-- change only through service_role or the SECURITY DEFINER credit trigger. (A BEFORE UPDATE
-- trigger in 0004 enforces the same for any other non-privileged role.) No INSERT/DELETE:
-- creating and deleting tenants is a service operation.
GRANT SELECT ON TABLE workspaces TO authenticated;
GRANT UPDATE (name, slug, timezone, currency, ai_preferences) ON TABLE workspaces TO authenticated;

GRANT ALL ON TABLE workspaces, users, tasks, stores, products, product_variants, customers,
  orders, content_projects, analytics_events TO service_role;

-- ---------------------------------------------------------------------------------------------
-- Row-level security. ENABLE (not FORCE): the owner runs migrations and SECURITY DEFINER
-- triggers and must bypass RLS; service_role bypasses it via BYPASSRLS.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE workspaces ENABLE ROW LEVEL SECURITY;
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE tasks ENABLE ROW LEVEL SECURITY;
ALTER TABLE stores ENABLE ROW LEVEL SECURITY;
ALTER TABLE products ENABLE ROW LEVEL SECURITY;
ALTER TABLE product_variants ENABLE ROW LEVEL SECURITY;
ALTER TABLE customers ENABLE ROW LEVEL SECURITY;
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE content_projects ENABLE ROW LEVEL SECURITY;
ALTER TABLE analytics_events ENABLE ROW LEVEL SECURITY;

-- FIX: the seed had one `FOR ALL USING (workspace_id = current_user_workspace())` policy per
-- table: no WITH CHECK distinct from USING, no role distinction (viewers could write, members
-- could read store credentials, anyone could rewrite their workspace's credit balance or their
-- own role). The seed's policy names are kept for the read (SELECT) policy of each table and
-- write policies are added per command. Helper calls are wrapped in (SELECT ...) so they are
-- evaluated once per statement (an InitPlan), not once per row.

-- workspaces ----------------------------------------------------------------------------------
DROP POLICY IF EXISTS workspace_access ON workspaces;
CREATE POLICY workspace_access ON workspaces
  FOR SELECT TO authenticated
  USING (id = (SELECT current_user_workspace()));

DROP POLICY IF EXISTS workspace_update ON workspaces;
CREATE POLICY workspace_update ON workspaces
  FOR UPDATE TO authenticated
  USING (id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'))
  WITH CHECK (id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'));

-- users ---------------------------------------------------------------------------------------
DROP POLICY IF EXISTS user_workspace_access ON users;
CREATE POLICY user_workspace_access ON users
  FOR SELECT TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()));

DROP POLICY IF EXISTS user_insert ON users;
CREATE POLICY user_insert ON users
  FOR INSERT TO authenticated
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'));

DROP POLICY IF EXISTS user_update ON users;
CREATE POLICY user_update ON users
  FOR UPDATE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'))
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'));

-- Anyone may edit their own profile; role/permissions/workspace/auth link cannot change this way
-- (current_user_role() reads the pre-update row; the protect_user_privileges trigger in 0004
-- additionally rejects any privileged-column change by a non-admin).
DROP POLICY IF EXISTS user_update_self ON users;
CREATE POLICY user_update_self ON users
  FOR UPDATE TO authenticated
  USING (auth_user_id = (SELECT auth.uid()))
  WITH CHECK (auth_user_id = (SELECT auth.uid())
              AND workspace_id = (SELECT current_user_workspace())
              AND role = (SELECT current_user_role()));

DROP POLICY IF EXISTS user_delete ON users;
CREATE POLICY user_delete ON users
  FOR DELETE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'));

-- stores: owners/admins only (they hold platform credentials) ---------------------------------
DROP POLICY IF EXISTS store_workspace_access ON stores;
CREATE POLICY store_workspace_access ON stores
  FOR SELECT TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'));

DROP POLICY IF EXISTS store_insert ON stores;
CREATE POLICY store_insert ON stores
  FOR INSERT TO authenticated
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'));

DROP POLICY IF EXISTS store_update ON stores;
CREATE POLICY store_update ON stores
  FOR UPDATE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'))
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'));

DROP POLICY IF EXISTS store_delete ON stores;
CREATE POLICY store_delete ON stores
  FOR DELETE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin'));

-- Workspace data: every member reads; owner/admin/member write; viewers read only. ------------
-- tasks
DROP POLICY IF EXISTS task_workspace_access ON tasks;
CREATE POLICY task_workspace_access ON tasks
  FOR SELECT TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()));
DROP POLICY IF EXISTS task_insert ON tasks;
CREATE POLICY task_insert ON tasks
  FOR INSERT TO authenticated
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS task_update ON tasks;
CREATE POLICY task_update ON tasks
  FOR UPDATE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'))
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS task_delete ON tasks;
CREATE POLICY task_delete ON tasks
  FOR DELETE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));

-- products
DROP POLICY IF EXISTS product_workspace_access ON products;
CREATE POLICY product_workspace_access ON products
  FOR SELECT TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()));
DROP POLICY IF EXISTS product_insert ON products;
CREATE POLICY product_insert ON products
  FOR INSERT TO authenticated
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS product_update ON products;
CREATE POLICY product_update ON products
  FOR UPDATE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'))
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS product_delete ON products;
CREATE POLICY product_delete ON products
  FOR DELETE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));

-- product_variants
DROP POLICY IF EXISTS product_variant_workspace_access ON product_variants;
CREATE POLICY product_variant_workspace_access ON product_variants
  FOR SELECT TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()));
DROP POLICY IF EXISTS product_variant_insert ON product_variants;
CREATE POLICY product_variant_insert ON product_variants
  FOR INSERT TO authenticated
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS product_variant_update ON product_variants;
CREATE POLICY product_variant_update ON product_variants
  FOR UPDATE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'))
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS product_variant_delete ON product_variants;
CREATE POLICY product_variant_delete ON product_variants
  FOR DELETE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));

-- customers
DROP POLICY IF EXISTS customer_workspace_access ON customers;
CREATE POLICY customer_workspace_access ON customers
  FOR SELECT TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()));
DROP POLICY IF EXISTS customer_insert ON customers;
CREATE POLICY customer_insert ON customers
  FOR INSERT TO authenticated
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS customer_update ON customers;
CREATE POLICY customer_update ON customers
  FOR UPDATE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'))
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS customer_delete ON customers;
CREATE POLICY customer_delete ON customers
  FOR DELETE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));

-- orders
DROP POLICY IF EXISTS order_workspace_access ON orders;
CREATE POLICY order_workspace_access ON orders
  FOR SELECT TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()));
DROP POLICY IF EXISTS order_insert ON orders;
CREATE POLICY order_insert ON orders
  FOR INSERT TO authenticated
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS order_update ON orders;
CREATE POLICY order_update ON orders
  FOR UPDATE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'))
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS order_delete ON orders;
CREATE POLICY order_delete ON orders
  FOR DELETE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));

-- content_projects
DROP POLICY IF EXISTS content_project_workspace_access ON content_projects;
CREATE POLICY content_project_workspace_access ON content_projects
  FOR SELECT TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()));
DROP POLICY IF EXISTS content_project_insert ON content_projects;
CREATE POLICY content_project_insert ON content_projects
  FOR INSERT TO authenticated
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS content_project_update ON content_projects;
CREATE POLICY content_project_update ON content_projects
  FOR UPDATE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'))
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS content_project_delete ON content_projects;
CREATE POLICY content_project_delete ON content_projects
  FOR DELETE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));

-- analytics_events
DROP POLICY IF EXISTS analytics_event_workspace_access ON analytics_events;
CREATE POLICY analytics_event_workspace_access ON analytics_events
  FOR SELECT TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()));
DROP POLICY IF EXISTS analytics_event_insert ON analytics_events;
CREATE POLICY analytics_event_insert ON analytics_events
  FOR INSERT TO authenticated
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS analytics_event_update ON analytics_events;
CREATE POLICY analytics_event_update ON analytics_events
  FOR UPDATE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'))
  WITH CHECK (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
DROP POLICY IF EXISTS analytics_event_delete ON analytics_events;
CREATE POLICY analytics_event_delete ON analytics_events
  FOR DELETE TO authenticated
  USING (workspace_id = (SELECT current_user_workspace()) AND (SELECT current_user_role()) IN ('owner', 'admin', 'member'));
