-- 0017_privileges_allow_list.sql — tenants hold privileges by allow-list; workspace slugs are
-- never UUID-shaped. (Issue 16, findings 4 and 7; notes/tenant-privs.md is the operator's
-- guide.)
--
--  1. Privileges by allow-list. On Supabase, default privileges give `anon` and
--     `authenticated` ALL on every table, sequence and function the migrating role creates.
--     Earlier migrations revoked them from engine objects by name, so every object they did
--     not name stayed open: `task_types` (TRUNCATE; TRIGGER, so a `pg_temp` trigger function
--     ran inside the worker's registration upsert with the engine's rights),
--     `admin_events_id_seq` (setval to its maximum made every dashboard action fail before
--     its audit row), `_sqlx_migrations` and both views for `anon`.
--     Now `bizq_tenant_grants` lists everything `anon` and `authenticated` may hold in schema
--     public, and bizq_enforce_privileges() revokes from them (and from PUBLIC) every
--     privilege beyond that list, whoever granted it, then checks the effective privileges
--     (has_*_privilege) against the list and fails if anything is left. It runs at the end of
--     this migration and after every `bizq migrate` (shared/src/db.rs), so an object a later
--     migration creates, or an operator adds by hand, loses whatever it was not listed for.
--     The list is an upper bound: enforcing never grants (a grant is a migration's GRANT
--     statement, the list only says it is allowed to stay).
--     It also refuses triggers on tables of schema public that would run someone else's code
--     as the engine (bizq_untrusted_triggers(): a function in a temporary schema, or owned by
--     a role that neither owns the table nor is a superuser); the worker checks the same
--     before its registration upsert (shared/src/task_types.rs).
--  2. Slugs. The dashboard resolved `?workspace=` by `slug = $1 OR id::text = $1`, so an owner
--     who set its slug to another workspace's id made "cancel matching" from its own row act
--     on the other workspace. The dashboard now links by id and resolves a UUID-shaped value
--     by id only; and a slug can no longer be UUID-shaped (CHECK workspaces_slug_not_uuid:
--     after removing a `urn:uuid:` prefix, braces, hyphens and white space, not 32 hex
--     digits, whatever the case). Existing UUID-shaped slugs are renamed first, to
--     `renamed-<the workspace's own id>` (with `-2`, `-3`, … if that is taken), each rename
--     recorded in `admin_events` (actor `migration 0017`, action `rename_uuid_slug`, old and
--     new slug in `target`) and reported with a NOTICE.
--
-- Idempotent: CREATE ... IF NOT EXISTS, CREATE OR REPLACE of functions new here, INSERT ... ON
-- CONFLICT, a constraint added only when missing, REVOKE only.

-- ---------------------------------------------------------------------------------------------
-- 1. The allow-list. Engine-only: RLS on, no policy, nothing granted to tenants.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS bizq_tenant_grants (
  -- The Supabase roles a tenant session runs as. PUBLIC never holds anything on a table,
  -- sequence or non-extension function of schema public, nor CREATE on the schema.
  grantee     TEXT NOT NULL
              CONSTRAINT bizq_tenant_grants_grantee CHECK (grantee IN ('anon', 'authenticated')),
  object_type TEXT NOT NULL
              CONSTRAINT bizq_tenant_grants_object_type
              CHECK (object_type IN ('schema', 'table', 'sequence', 'function')),
  -- In schema public, unqualified: a table, view, materialized view or foreign table name
  -- ('table'), a sequence name, a function signature as regprocedure prints it
  -- ('bizq_cancel_task(uuid,text)'), or 'public' for the schema itself.
  object_name TEXT NOT NULL,
  privilege   TEXT NOT NULL,
  -- NULL: the privilege on the whole table. Else only on these columns.
  columns     TEXT[],
  -- 'bizq' for the engine's own rows (migrations may replace them), anything else for rows
  -- an operator added for tables of their own.
  source      TEXT NOT NULL DEFAULT 'operator',
  reason      TEXT NOT NULL,
  PRIMARY KEY (grantee, object_type, object_name, privilege),
  -- What can never be allowed: TRUNCATE (ignores RLS), TRIGGER (runs the tenant's code as
  -- whoever writes the table), REFERENCES, sequence UPDATE (setval), schema CREATE.
  CONSTRAINT bizq_tenant_grants_privilege CHECK (
       (object_type = 'schema' AND object_name = 'public' AND privilege = 'USAGE')
    OR (object_type = 'table' AND privilege IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE'))
    OR (object_type = 'sequence' AND privilege IN ('USAGE', 'SELECT'))
    OR (object_type = 'function' AND privilege = 'EXECUTE')),
  CONSTRAINT bizq_tenant_grants_columns CHECK (
    columns IS NULL
    OR (object_type = 'table' AND privilege IN ('SELECT', 'INSERT', 'UPDATE')
        AND cardinality(columns) > 0))
);
ALTER TABLE bizq_tenant_grants ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON TABLE bizq_tenant_grants FROM PUBLIC, anon, authenticated;
GRANT SELECT ON TABLE bizq_tenant_grants TO service_role;

-- What a member's session needs, and nothing else; `anon` needs nothing but the schema (no
-- policy is written for it, so it reads and writes no row anyway).
INSERT INTO bizq_tenant_grants (grantee, object_type, object_name, privilege, columns, source, reason)
VALUES
  ('anon', 'schema', 'public', 'USAGE', NULL, 'bizq', 'PostgREST resolves names in public'),
  ('authenticated', 'schema', 'public', 'USAGE', NULL, 'bizq', 'PostgREST resolves names in public'),
  -- The ten tables (0002, 0009), RLS policies per command.
  ('authenticated', 'table', 'workspaces', 'SELECT', NULL, 'bizq', 'members read their workspace (0002)'),
  ('authenticated', 'table', 'workspaces', 'UPDATE',
   ARRAY['name', 'slug', 'timezone', 'currency', 'ai_preferences'], 'bizq',
   'owners and admins edit the settings; billing columns are not grantable (0002)'),
  ('authenticated', 'table', 'users', 'SELECT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'users', 'INSERT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'users', 'UPDATE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'users', 'DELETE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'tasks', 'SELECT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'tasks', 'INSERT',
   ARRAY['id', 'workspace_id', 'type', 'category', 'name', 'description', 'priority', 'input',
         'worker_type', 'ai_model', 'ai_provider', 'estimated_cost', 'created_by', 'assigned_to',
         'parent_task_id', 'workflow_id', 'depends_on', 'blocks', 'scheduled_for', 'context',
         'tags', 'quality_score', 'user_feedback', 'max_attempts'], 'bizq',
   'product columns only; the engine writes the rest (0009)'),
  ('authenticated', 'table', 'tasks', 'UPDATE',
   ARRAY['name', 'description', 'priority', 'context', 'tags', 'quality_score', 'user_feedback',
         'assigned_to', 'workflow_id', 'parent_task_id', 'updated_at'], 'bizq',
   'what describes a task to people (0009); cancel and retry go through functions'),
  ('authenticated', 'table', 'tasks', 'DELETE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'stores', 'SELECT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'stores', 'INSERT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'stores', 'UPDATE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'stores', 'DELETE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'products', 'SELECT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'products', 'INSERT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'products', 'UPDATE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'products', 'DELETE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'product_variants', 'SELECT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'product_variants', 'INSERT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'product_variants', 'UPDATE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'product_variants', 'DELETE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'customers', 'SELECT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'customers', 'INSERT',
   ARRAY['id', 'workspace_id', 'email', 'first_name', 'last_name', 'phone', 'date_of_birth',
         'gender', 'addresses', 'default_address', 'last_active_at', 'status',
         'accepts_marketing', 'customer_segment', 'tags', 'support_tickets',
         'support_satisfaction', 'support_notes', 'ai_insights', 'customer_persona',
         'predicted_ltv', 'churn_risk_score', 'external_customer_ids', 'created_at',
         'updated_at'], 'bizq',
   'every column but the metrics computed from orders (0009)'),
  ('authenticated', 'table', 'customers', 'UPDATE',
   ARRAY['id', 'workspace_id', 'email', 'first_name', 'last_name', 'phone', 'date_of_birth',
         'gender', 'addresses', 'default_address', 'last_active_at', 'status',
         'accepts_marketing', 'customer_segment', 'tags', 'support_tickets',
         'support_satisfaction', 'support_notes', 'ai_insights', 'customer_persona',
         'predicted_ltv', 'churn_risk_score', 'external_customer_ids', 'created_at',
         'updated_at'], 'bizq',
   'every column but the metrics computed from orders (0009)'),
  ('authenticated', 'table', 'customers', 'DELETE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'orders', 'SELECT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'orders', 'INSERT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'orders', 'UPDATE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'orders', 'DELETE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'content_projects', 'SELECT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'content_projects', 'INSERT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'content_projects', 'UPDATE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'content_projects', 'DELETE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'analytics_events', 'SELECT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'analytics_events', 'INSERT', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'analytics_events', 'UPDATE', NULL, 'bizq', '0002'),
  ('authenticated', 'table', 'analytics_events', 'DELETE', NULL, 'bizq', '0002'),
  -- security_invoker views (0005): the tables' RLS applies to the reader.
  ('authenticated', 'table', 'workspace_dashboard', 'SELECT', NULL, 'bizq', '0005'),
  ('authenticated', 'table', 'task_performance', 'SELECT', NULL, 'bizq', '0005'),
  -- Called by the RLS policies and CHECK constraints of the tables above (0002, 0009), and
  -- the member's cancel and retry (0009).
  ('authenticated', 'function', 'current_user_workspace()', 'EXECUTE', NULL, 'bizq', 'RLS policies'),
  ('authenticated', 'function', 'current_user_role()', 'EXECUTE', NULL, 'bizq', 'RLS policies'),
  ('authenticated', 'function', 'user_has_role(text)', 'EXECUTE', NULL, 'bizq', 'RLS helper (0002)'),
  ('authenticated', 'function', 'user_can_access_workspace(uuid)', 'EXECUTE', NULL, 'bizq', 'RLS helper (0002)'),
  ('authenticated', 'function', 'user_can_write(uuid)', 'EXECUTE', NULL, 'bizq', 'RLS helper (0002)'),
  ('authenticated', 'function', 'user_is_workspace_admin(uuid)', 'EXECUTE', NULL, 'bizq', 'RLS helper (0002)'),
  ('authenticated', 'function', 'bizq_is_privileged_session()', 'EXECUTE', NULL, 'bizq', 'RLS helper (0002)'),
  ('authenticated', 'function', 'is_valid_timezone(text)', 'EXECUTE', NULL, 'bizq', 'CHECK on workspaces.timezone'),
  ('authenticated', 'function', 'is_credentials_envelope(jsonb)', 'EXECUTE', NULL, 'bizq', 'CHECK on stores.credentials'),
  ('authenticated', 'function', 'bizq_cancel_task(uuid,text)', 'EXECUTE', NULL, 'bizq', 'a member cancels a task (0009)'),
  ('authenticated', 'function', 'bizq_retry_task(uuid)', 'EXECUTE', NULL, 'bizq', 'a member retries a task (0009)')
ON CONFLICT (grantee, object_type, object_name, privilege) DO UPDATE
   SET columns = EXCLUDED.columns,
       source = EXCLUDED.source,
       reason = EXCLUDED.reason;

-- ---------------------------------------------------------------------------------------------
-- Triggers that would run someone else's code as the engine: on a table of schema public, a
-- trigger (not an internal one, such as a foreign key's) whose function lives in a temporary
-- schema, or is owned by a role that neither owns the table nor is a superuser.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION bizq_untrusted_triggers()
RETURNS TABLE (table_name text, trigger_name text, function_name text, function_owner text)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT c.oid::regclass::text,
         t.tgname::text,
         p.oid::regprocedure::text,
         pg_get_userbyid(p.proowner)::text
    FROM pg_trigger t
    JOIN pg_class c ON c.oid = t.tgrelid
    JOIN pg_proc p ON p.oid = t.tgfoid
    JOIN pg_namespace fn ON fn.oid = p.pronamespace
    JOIN pg_roles o ON o.oid = p.proowner
   WHERE c.relnamespace = 'public'::regnamespace
     AND NOT t.tgisinternal
     AND (fn.nspname LIKE 'pg\_temp\_%'
          OR (p.proowner <> c.relowner AND NOT o.rolsuper))
   ORDER BY 1, 2
$$;

-- ---------------------------------------------------------------------------------------------
-- What `anon` and `authenticated` effectively hold (has_*_privilege: their own grants and
-- PUBLIC's) in schema public beyond bizq_tenant_grants. Extension functions are judged by
-- their grants to the two roles only: PUBLIC's default EXECUTE on them is the extension's
-- business (pgcrypto's was revoked in 0009).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION bizq_privileges_beyond_allow_list()
RETURNS TABLE (role_name text, object_type text, object_name text, column_name text,
               privilege text)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, public, pg_temp
AS $$
  WITH roles AS (
    SELECT r.oid, r.rolname::text AS rolname
      FROM pg_roles r
     WHERE r.rolname IN ('anon', 'authenticated')
  ),
  allowed AS (
    SELECT g.grantee, g.object_type, g.privilege, g.columns,
           CASE g.object_type
             WHEN 'function' THEN to_regprocedure('public.' || g.object_name)::oid
             WHEN 'schema' THEN 'public'::regnamespace::oid
             ELSE to_regclass(format('public.%I', g.object_name))::oid
           END AS oid
      FROM bizq_tenant_grants g
  ),
  held AS (
    SELECT r.rolname, 'table'::text AS object_type, c.oid, c.relname::text AS name,
           NULL::text AS col, p.priv
      FROM roles r
     CROSS JOIN pg_class c
     CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES',
                             'TRIGGER']) AS p(priv)
     WHERE c.relnamespace = 'public'::regnamespace
       AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
       AND has_table_privilege(r.oid, c.oid, p.priv)
    UNION ALL
    SELECT r.rolname, 'table', c.oid, c.relname::text, a.attname::text, p.priv
      FROM roles r
     CROSS JOIN pg_class c
      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
     CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'REFERENCES']) AS p(priv)
     WHERE c.relnamespace = 'public'::regnamespace
       AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
       AND has_column_privilege(r.oid, c.oid, a.attnum, p.priv)
       AND NOT has_table_privilege(r.oid, c.oid, p.priv)
    UNION ALL
    SELECT r.rolname, 'sequence', c.oid, c.relname::text, NULL, p.priv
      FROM roles r
     CROSS JOIN pg_class c
     CROSS JOIN unnest(ARRAY['USAGE', 'SELECT', 'UPDATE']) AS p(priv)
     WHERE c.relnamespace = 'public'::regnamespace
       AND c.relkind = 'S'
       AND has_sequence_privilege(r.oid, c.oid, p.priv)
    UNION ALL
    SELECT r.rolname, 'function', f.oid, f.oid::regprocedure::text, NULL, 'EXECUTE'
      FROM roles r
     CROSS JOIN pg_proc f
     WHERE f.pronamespace = 'public'::regnamespace
       AND has_function_privilege(r.oid, f.oid, 'EXECUTE')
       AND (NOT EXISTS (SELECT 1 FROM pg_depend d
                         WHERE d.classid = 'pg_proc'::regclass AND d.objid = f.oid
                           AND d.deptype = 'e')
            OR EXISTS (SELECT 1 FROM aclexplode(f.proacl) x
                        WHERE x.grantee = r.oid AND x.privilege_type = 'EXECUTE'))
    UNION ALL
    SELECT r.rolname, 'schema', 'public'::regnamespace::oid, 'public', NULL, p.priv
      FROM roles r
     CROSS JOIN unnest(ARRAY['USAGE', 'CREATE']) AS p(priv)
     WHERE has_schema_privilege(r.oid, 'public', p.priv)
  )
  SELECT h.rolname, h.object_type, h.name, h.col, h.priv
    FROM held h
   WHERE NOT EXISTS (
           SELECT 1
             FROM allowed a
            WHERE a.grantee = h.rolname
              AND a.object_type = h.object_type
              AND a.oid = h.oid
              AND a.privilege = h.priv
              AND (a.columns IS NULL OR h.col = ANY (a.columns)))
   ORDER BY 1, 2, 3, 4, 5
$$;

-- ---------------------------------------------------------------------------------------------
-- The enforcement: revokes every ACL entry of schema public's tables, views, sequences,
-- functions, types and of the schema itself that gives `anon`, `authenticated` or PUBLIC
-- something beyond the list, returns what it revoked, and fails when the roles still hold
-- more (e.g. a grant made by another grantor that this role cannot revoke) or when an
-- untrusted trigger exists. Run by the migrating role (not SECURITY DEFINER: it revokes as
-- whoever runs migrations, who owns the objects).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION bizq_enforce_privileges()
RETURNS TABLE (role_name text, object_type text, object_name text, column_name text,
               privilege text)
LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
DECLARE
  r record;
  left_over text;
BEGIN
  -- One enforcement at a time (several `bizq migrate` may run at once; two REVOKEs of the
  -- same object would collide). Released at the end of the caller's transaction.
  PERFORM pg_advisory_xact_lock(hashtext('bizq_enforce_privileges'));
  SELECT string_agg(format('trigger %s on %s runs %s, owned by %s', u.trigger_name,
                           u.table_name, u.function_name, u.function_owner), '; ')
    INTO left_over
    FROM bizq_untrusted_triggers() u;
  IF left_over IS NOT NULL THEN
    RAISE EXCEPTION 'refusing to go on: %', left_over
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Such a trigger runs its owner''s code with the rights of whoever writes the '
                   'table (the engine). Drop it (DROP TRIGGER ... ON ...) after finding out who '
                   'created it, or give the function to the table''s owner if it is yours.';
  END IF;

  FOR r IN
    WITH roles AS (
      SELECT 0::oid AS oid, 'PUBLIC'::text AS rolname
      UNION ALL
      SELECT g.oid, g.rolname::text FROM pg_roles g WHERE g.rolname IN ('anon', 'authenticated')
    ),
    allowed AS (
      SELECT g.grantee, g.object_type, g.privilege, g.columns,
             CASE g.object_type
               WHEN 'function' THEN to_regprocedure('public.' || g.object_name)::oid
               WHEN 'schema' THEN 'public'::regnamespace::oid
               ELSE to_regclass(format('public.%I', g.object_name))::oid
             END AS oid
        FROM bizq_tenant_grants g
    ),
    entries AS (
      SELECT CASE WHEN c.relkind = 'S' THEN 'sequence' ELSE 'table' END AS object_type,
             c.oid, c.oid::regclass::text AS target, c.relname::text AS name,
             NULL::text AS col, x.grantee, x.privilege_type AS priv
        FROM pg_class c
       CROSS JOIN LATERAL aclexplode(c.relacl) x
       WHERE c.relnamespace = 'public'::regnamespace
         AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
      UNION ALL
      SELECT 'table', c.oid, c.oid::regclass::text, c.relname::text, a.attname::text,
             x.grantee, x.privilege_type
        FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
       CROSS JOIN LATERAL aclexplode(a.attacl) x
       WHERE c.relnamespace = 'public'::regnamespace
         AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
      UNION ALL
      -- A NULL proacl means the default: EXECUTE for PUBLIC. Extension functions keep
      -- PUBLIC's (the extension's business), not grants to the two roles.
      SELECT 'function', f.oid, f.oid::regprocedure::text, f.oid::regprocedure::text, NULL,
             x.grantee, x.privilege_type
        FROM pg_proc f
       CROSS JOIN LATERAL aclexplode(coalesce(f.proacl, acldefault('f', f.proowner))) x
       WHERE f.pronamespace = 'public'::regnamespace
         AND NOT (x.grantee = 0
                  AND EXISTS (SELECT 1 FROM pg_depend d
                               WHERE d.classid = 'pg_proc'::regclass AND d.objid = f.oid
                                 AND d.deptype = 'e'))
      UNION ALL
      -- Types: only explicit grants to the two roles (PUBLIC's default USAGE stays).
      SELECT 'type', t.oid, t.oid::regtype::text, t.oid::regtype::text, NULL, x.grantee,
             x.privilege_type
        FROM pg_type t
       CROSS JOIN LATERAL aclexplode(t.typacl) x
       WHERE t.typnamespace = 'public'::regnamespace
         AND t.typcategory <> 'A'
         AND x.grantee <> 0
      UNION ALL
      -- The schema: CREATE for nobody; PUBLIC's USAGE stays.
      SELECT 'schema', n.oid, 'public', 'public', NULL, x.grantee, x.privilege_type
        FROM pg_namespace n
       CROSS JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) x
       WHERE n.nspname = 'public'
         AND NOT (x.grantee = 0 AND x.privilege_type = 'USAGE')
    )
    SELECT e.object_type, e.target, e.name, e.col, e.priv, ro.rolname,
           CASE WHEN ro.oid = 0 THEN 'PUBLIC' ELSE quote_ident(ro.rolname) END AS grantee_sql
      FROM entries e
      JOIN roles ro ON ro.oid = e.grantee
     WHERE NOT EXISTS (
             SELECT 1
               FROM allowed a
              WHERE a.grantee = ro.rolname
                AND a.object_type = e.object_type
                AND a.oid = e.oid
                AND a.privilege = e.priv
                AND ((e.col IS NULL AND a.columns IS NULL)
                     OR (e.col IS NOT NULL AND (a.columns IS NULL OR e.col = ANY (a.columns)))))
     ORDER BY 1, 2, 4, 5, 6
  LOOP
    CASE r.object_type
      WHEN 'table' THEN
        IF r.col IS NULL THEN
          EXECUTE format('REVOKE %s ON TABLE %s FROM %s', r.priv, r.target, r.grantee_sql);
        ELSE
          EXECUTE format('REVOKE %s (%I) ON TABLE %s FROM %s', r.priv, r.col, r.target,
                         r.grantee_sql);
        END IF;
      WHEN 'sequence' THEN
        EXECUTE format('REVOKE %s ON SEQUENCE %s FROM %s', r.priv, r.target, r.grantee_sql);
      WHEN 'function' THEN
        EXECUTE format('REVOKE %s ON ROUTINE %s FROM %s', r.priv, r.target, r.grantee_sql);
      WHEN 'type' THEN
        EXECUTE format('REVOKE %s ON TYPE %s FROM %s', r.priv, r.target, r.grantee_sql);
      WHEN 'schema' THEN
        EXECUTE format('REVOKE %s ON SCHEMA public FROM %s', r.priv, r.grantee_sql);
    END CASE;
    role_name := r.rolname;
    object_type := r.object_type;
    object_name := r.name;
    column_name := r.col;
    privilege := r.priv;
    RETURN NEXT;
  END LOOP;

  SELECT string_agg(format('%s %s on %s %s%s', b.role_name, b.privilege, b.object_type,
                           b.object_name, coalesce(' (' || b.column_name || ')', '')), '; ')
    INTO left_over
    FROM bizq_privileges_beyond_allow_list() b;
  IF left_over IS NOT NULL THEN
    RAISE EXCEPTION 'tenant roles still hold privileges beyond bizq_tenant_grants: %', left_over
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'A grant made by another grantor can only be revoked by it (or a superuser '
                   'acting as the owner); revoke it, or add a row to bizq_tenant_grants if '
                   'tenants need it.';
  END IF;
END;
$$;

REVOKE EXECUTE ON FUNCTION bizq_untrusted_triggers(), bizq_privileges_beyond_allow_list(),
  bizq_enforce_privileges() FROM PUBLIC, anon, authenticated;
-- The worker checks the triggers before its registration upsert, whatever role it runs as.
GRANT EXECUTE ON FUNCTION bizq_untrusted_triggers(), bizq_privileges_beyond_allow_list()
  TO service_role;

-- ---------------------------------------------------------------------------------------------
-- 2. Slugs are never UUID-shaped. Existing ones are renamed (and recorded) first.
-- ---------------------------------------------------------------------------------------------
DO $$
DECLARE
  w record;
  candidate text;
  n integer;
BEGIN
  FOR w IN
    SELECT id, slug
      FROM workspaces
     WHERE regexp_replace(lower(slug), 'urn:uuid:|[{}[:space:]-]', '', 'g') ~ '^[0-9a-f]{32}$'
     ORDER BY created_at, id
  LOOP
    candidate := 'renamed-' || w.id::text;
    n := 1;
    WHILE EXISTS (SELECT 1 FROM workspaces WHERE slug = candidate) LOOP
      n := n + 1;
      candidate := 'renamed-' || w.id::text || '-' || n;
    END LOOP;
    UPDATE workspaces SET slug = candidate WHERE id = w.id;
    INSERT INTO admin_events (actor, action, target)
    VALUES ('migration 0017', 'rename_uuid_slug',
            jsonb_build_object('workspace', w.id, 'old_slug', w.slug, 'new_slug', candidate));
    RAISE NOTICE 'workspace %: UUID-shaped slug % renamed to %', w.id, w.slug, candidate;
  END LOOP;

  IF NOT EXISTS (SELECT 1 FROM pg_constraint
                  WHERE conrelid = 'public.workspaces'::regclass
                    AND conname = 'workspaces_slug_not_uuid') THEN
    ALTER TABLE workspaces ADD CONSTRAINT workspaces_slug_not_uuid
      CHECK (regexp_replace(lower(slug), 'urn:uuid:|[{}[:space:]-]', '', 'g') !~ '^[0-9a-f]{32}$');
  END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Last: enforce the list on everything that exists now (`bizq migrate` runs it again after
-- every later migration).
-- ---------------------------------------------------------------------------------------------
SELECT count(*) AS revoked FROM bizq_enforce_privileges();
