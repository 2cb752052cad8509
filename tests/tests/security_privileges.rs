//! Privileges are explicit (issue 8, attack 8, and the timeouts of attack 5): with Supabase's
//! default privileges (ALL on new tables and functions for `anon` and `authenticated`), the
//! engine's tables stay closed to tenants, no function is executable by them beyond an exact
//! list, pgcrypto is not theirs, functions created later are not executable by PUBLIC, and
//! `authenticated` has statement and idle-in-transaction timeouts. Pinned by the privilege and
//! ALTER ROLE sections of migration 0009.
//!
//! Issue 16, finding 4: under Supabase's default privileges (ALL on tables, sequences and
//! functions for anon, authenticated and service_role), what those roles hold is exactly the
//! allow-list of migration 0017, also for objects created after the migrations (`bizq
//! migrate` enforces it every time); they cannot TRUNCATE or put a trigger on `task_types`,
//! nor move `admin_events_id_seq`; and no trigger running a foreign function survives the
//! enforcement or the worker's registration.

use std::collections::BTreeSet;

use bizq_tests::schema_support::{
    act_as, connect, create_tenant, exec, expect_sqlstate, supabase_default_privileges,
};
use sqlx::PgPool;

const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Every function of schema `public` that `role` may execute.
async fn executable_by(pool: &PgPool, role: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT p.proname::text
           FROM pg_proc p
           JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = 'public'
            AND has_function_privilege($1, p.oid, 'EXECUTE')
          ORDER BY 1",
    )
    .bind(role)
    .fetch_all(pool)
    .await?)
}

/// Migrates a database the way Supabase would: default privileges give anon and
/// authenticated ALL on every table and function the migrating role creates.
#[sqlx::test(migrations = false)]
async fn supabase_default_grants_do_not_open_engine_tables(pool: PgPool) -> anyhow::Result<()> {
    for role in ["anon", "authenticated", "service_role"] {
        // Cluster-wide roles; another test database may create them at the same moment.
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                 CREATE ROLE {role} NOLOGIN NOINHERIT; END IF;
               EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        )))
        .execute(&pool)
        .await;
    }
    sqlx::raw_sql(
        "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated;
         ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated;",
    )
    .execute(&pool)
    .await?;
    bizq::db::migrate(&pool).await?;

    let a = create_tenant(&pool, "supabase").await?;
    let mut conn = connect(&pool).await?;
    for role in ["anon", "authenticated"] {
        if role == "anon" {
            exec(&mut conn, "RESET ROLE").await?;
            exec(&mut conn, "SET ROLE anon").await?;
        } else {
            act_as(&mut conn, a.member.auth_id).await?;
        }
        for sql in [
            "TRUNCATE task_dependencies",
            "SELECT count(*) FROM task_dependencies",
            "DELETE FROM task_dependencies",
            "SELECT count(*) FROM bizq_limits",
            "TRUNCATE tasks",
        ] {
            expect_sqlstate(
                exec(&mut conn, sql).await,
                INSUFFICIENT_PRIVILEGE,
                &format!("{role}: {sql}"),
            );
        }
        // pgcrypto is not theirs: with a key in hand they still cannot decrypt themselves.
        expect_sqlstate(
            exec(
                &mut conn,
                "SELECT pgp_sym_decrypt(pgp_sym_encrypt('x', 'k'), 'k')",
            )
            .await,
            INSUFFICIENT_PRIVILEGE,
            &format!("{role}: pgcrypto"),
        );
    }

    let tenant_helpers = [
        "bizq_is_privileged_session",
        "current_user_role",
        "current_user_workspace",
        "gen_random_uuid",
        "is_credentials_envelope",
        "is_valid_timezone",
        "user_can_access_workspace",
        "user_can_write",
        "user_has_role",
        "user_is_workspace_admin",
    ];
    // anon is no member: nothing of ours, only pgcrypto's gen_random_uuid, which PUBLIC
    // keeps (0009) and the core one shadows anyway (0017's allow-list).
    assert_eq!(executable_by(&pool, "anon").await?, ["gen_random_uuid"]);
    let mut member = tenant_helpers.to_vec();
    member.extend(["bizq_cancel_task", "bizq_retry_task"]);
    member.sort();
    assert_eq!(executable_by(&pool, "authenticated").await?, member);
    Ok(())
}

/// Functions created after the migrations (by the migrating role) are not executable by
/// PUBLIC: `ALTER DEFAULT PRIVILEGES ... REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC`.
#[sqlx::test(migrations = "../migrations")]
async fn new_functions_are_not_public(pool: PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql("CREATE FUNCTION later_one() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$")
        .execute(&pool)
        .await?;
    let public: bool = sqlx::query_scalar(
        "SELECT has_function_privilege('anon', 'later_one()'::regprocedure, 'EXECUTE')",
    )
    .fetch_one(&pool)
    .await?;
    assert!(!public, "a new function is executable by PUBLIC");
    assert!(
        executable_by(&pool, "anon")
            .await?
            .iter()
            .all(|f| f != "bizq_engine_cancel_task" && f != "store_credentials"),
        "engine functions executable by anon"
    );
    Ok(())
}

/// `authenticated` gets a statement timeout (30 s) and an idle-in-transaction timeout (60 s)
/// in this database, so a tenant cannot hold row locks for long (PostgREST applies a role's
/// settings when it switches to it).
#[sqlx::test(migrations = "../migrations")]
async fn tenant_sessions_have_timeouts(pool: PgPool) -> anyhow::Result<()> {
    let settings: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(s.setconfig)
           FROM pg_db_role_setting s
           JOIN pg_roles r ON r.oid = s.setrole
           JOIN pg_database d ON d.oid = s.setdatabase
          WHERE r.rolname = 'authenticated'
            AND d.datname = current_database()
          ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        settings,
        [
            "idle_in_transaction_session_timeout=60s",
            "statement_timeout=30s"
        ]
    );
    Ok(())
}

/// Every SECURITY DEFINER function of schema `public` pins its `search_path`, so a caller
/// cannot shadow the tables it reads with objects of their own.
#[sqlx::test(migrations = "../migrations")]
async fn definer_functions_pin_search_path(pool: PgPool) -> anyhow::Result<()> {
    let unpinned: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text
           FROM pg_proc p
           JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = 'public'
            AND p.prosecdef
            AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c(setting)
                             WHERE c.setting LIKE 'search_path=%')",
    )
    .fetch_all(&pool)
    .await?;
    assert!(unpinned.is_empty(), "{unpinned:?}");
    let definers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = 'public' AND p.prosecdef",
    )
    .fetch_one(&pool)
    .await?;
    assert!(definers >= 20, "{definers}");
    Ok(())
}

/// Everything `anon` and `authenticated` may do in schema public, read from the catalog: one
/// line per privilege, `<role> table <name> <PRIV>` (tables and views: has_table_privilege,
/// and information_schema.role_table_grants), `<role> column <table>.<column> <PRIV>` (a
/// column privilege without the table's), `<role> sequence <name> <PRIV>`, `<role> function
/// <signature>`, `<role> schema public <PRIV>`.
async fn tenant_holdings(pool: &PgPool) -> anyhow::Result<BTreeSet<String>> {
    let lines: Vec<String> = sqlx::query_scalar(
        "WITH roles (r) AS (VALUES ('anon'), ('authenticated'))
         SELECT r || ' table ' || c.relname || ' ' || p
           FROM roles
          CROSS JOIN pg_class c
          CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE',
                                  'REFERENCES', 'TRIGGER']) AS p
          WHERE c.relnamespace = 'public'::regnamespace
            AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
            AND has_table_privilege(r, c.oid, p)
         UNION
         SELECT grantee || ' table ' || table_name || ' ' || privilege_type
           FROM information_schema.role_table_grants
          WHERE table_schema = 'public'
            AND grantee IN ('anon', 'authenticated')
         UNION
         SELECT r || ' column ' || c.relname || '.' || a.attname || ' ' || p
           FROM roles
          CROSS JOIN pg_class c
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
          CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'REFERENCES']) AS p
          WHERE c.relnamespace = 'public'::regnamespace
            AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
            AND has_column_privilege(r, c.oid, a.attnum, p)
            AND NOT has_table_privilege(r, c.oid, p)
         UNION
         SELECT r || ' sequence ' || c.relname || ' ' || p
           FROM roles
          CROSS JOIN pg_class c
          CROSS JOIN unnest(ARRAY['USAGE', 'SELECT', 'UPDATE']) AS p
          WHERE c.relnamespace = 'public'::regnamespace
            AND c.relkind = 'S'
            AND has_sequence_privilege(r, c.oid, p)
         UNION
         SELECT r || ' function ' || f.oid::regprocedure::text
           FROM roles
          CROSS JOIN pg_proc f
          WHERE f.pronamespace = 'public'::regnamespace
            AND has_function_privilege(r, f.oid, 'EXECUTE')
         UNION
         SELECT r || ' schema public ' || p
           FROM roles
          CROSS JOIN unnest(ARRAY['USAGE', 'CREATE']) AS p
          WHERE has_schema_privilege(r, 'public', p)",
    )
    .fetch_all(pool)
    .await?;
    Ok(lines.into_iter().collect())
}

/// The allow-list, written out here on purpose (not read from the database): what a
/// member's session needs (0002's RLS tables, 0009's column grants and functions, 0005's
/// views), and for anon nothing but the schema. pgcrypto's gen_random_uuid stays executable
/// through PUBLIC (0009), so both roles see it.
fn expected_holdings() -> BTreeSet<String> {
    const TASK_INSERT: [&str; 24] = [
        "id",
        "workspace_id",
        "type",
        "category",
        "name",
        "description",
        "priority",
        "input",
        "worker_type",
        "ai_model",
        "ai_provider",
        "estimated_cost",
        "created_by",
        "assigned_to",
        "parent_task_id",
        "workflow_id",
        "depends_on",
        "blocks",
        "scheduled_for",
        "context",
        "tags",
        "quality_score",
        "user_feedback",
        "max_attempts",
    ];
    const TASK_UPDATE: [&str; 11] = [
        "name",
        "description",
        "priority",
        "context",
        "tags",
        "quality_score",
        "user_feedback",
        "assigned_to",
        "workflow_id",
        "parent_task_id",
        "updated_at",
    ];
    const CUSTOMER_WRITE: [&str; 25] = [
        "id",
        "workspace_id",
        "email",
        "first_name",
        "last_name",
        "phone",
        "date_of_birth",
        "gender",
        "addresses",
        "default_address",
        "last_active_at",
        "status",
        "accepts_marketing",
        "customer_segment",
        "tags",
        "support_tickets",
        "support_satisfaction",
        "support_notes",
        "ai_insights",
        "customer_persona",
        "predicted_ltv",
        "churn_risk_score",
        "external_customer_ids",
        "created_at",
        "updated_at",
    ];
    const WORKSPACE_UPDATE: [&str; 5] = ["name", "slug", "timezone", "currency", "ai_preferences"];
    let mut out = BTreeSet::new();
    for role in ["anon", "authenticated"] {
        out.insert(format!("{role} schema public USAGE"));
        out.insert(format!("{role} function public.gen_random_uuid()"));
    }
    let a = "authenticated";
    for table in [
        "users",
        "stores",
        "products",
        "product_variants",
        "orders",
        "content_projects",
        "analytics_events",
    ] {
        for p in ["SELECT", "INSERT", "UPDATE", "DELETE"] {
            out.insert(format!("{a} table {table} {p}"));
        }
    }
    for (table, p) in [
        ("workspaces", "SELECT"),
        ("tasks", "SELECT"),
        ("tasks", "DELETE"),
        ("customers", "SELECT"),
        ("customers", "DELETE"),
        ("workspace_dashboard", "SELECT"),
        ("task_performance", "SELECT"),
    ] {
        out.insert(format!("{a} table {table} {p}"));
    }
    let columns = [
        ("workspaces", "UPDATE", &WORKSPACE_UPDATE[..]),
        ("tasks", "INSERT", &TASK_INSERT[..]),
        ("tasks", "UPDATE", &TASK_UPDATE[..]),
        ("customers", "INSERT", &CUSTOMER_WRITE[..]),
        ("customers", "UPDATE", &CUSTOMER_WRITE[..]),
    ];
    for (table, p, cols) in columns {
        for c in cols {
            out.insert(format!("{a} column {table}.{c} {p}"));
        }
    }
    for f in [
        "current_user_workspace()",
        "current_user_role()",
        "user_has_role(text)",
        "user_can_access_workspace(uuid)",
        "user_can_write(uuid)",
        "user_is_workspace_admin(uuid)",
        "bizq_is_privileged_session()",
        "is_valid_timezone(text)",
        "is_credentials_envelope(jsonb)",
        "bizq_cancel_task(uuid,text)",
        "bizq_retry_task(uuid)",
    ] {
        out.insert(format!("{a} function {f}"));
    }
    out
}

/// `bizq_tenant_grants`, expanded to [`tenant_holdings`] lines.
async fn listed(pool: &PgPool) -> anyhow::Result<BTreeSet<String>> {
    let lines: Vec<String> = sqlx::query_scalar(
        "SELECT g.grantee || ' ' || g.object_type || ' ' || g.object_name
                || CASE WHEN g.object_type = 'function' THEN '' ELSE ' ' || g.privilege END
           FROM bizq_tenant_grants g
          WHERE g.columns IS NULL
         UNION ALL
         SELECT g.grantee || ' column ' || g.object_name || '.' || c || ' ' || g.privilege
           FROM bizq_tenant_grants g
          CROSS JOIN unnest(g.columns) AS c",
    )
    .fetch_all(pool)
    .await?;
    Ok(lines.into_iter().collect())
}

fn diff(held: &BTreeSet<String>, expected: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    (
        held.difference(expected).cloned().collect(),
        expected.difference(held).cloned().collect(),
    )
}

/// Pins the allow-list under Supabase's default privileges. On the schema before 0017 (the
/// finding, reproduced) anon and authenticated hold TRUNCATE and TRIGGER on task_types, the
/// audit sequence and _sqlx_migrations; after `bizq migrate` they hold exactly the list
/// written out above, and `bizq_tenant_grants` says the same. A table, sequence and function
/// created afterwards (the default privileges open them) make the comparison fail until the
/// next `bizq migrate`, which revokes them and reports what it revoked.
#[sqlx::test(migrations = false)]
async fn supabase_defaults_leave_tenants_exactly_the_allow_list(
    pool: PgPool,
) -> anyhow::Result<()> {
    supabase_default_privileges(&pool).await?;
    let expected = expected_holdings();

    // Today's schema (the last migration before 0017): the finding.
    let before = bizq::db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| *v < 17)
        .max()
        .expect("migrations before 0017");
    bizq::db::MIGRATOR.run_to(before, &pool).await?;
    let held = tenant_holdings(&pool).await?;
    for line in [
        "anon table task_types TRUNCATE",
        "anon table task_types TRIGGER",
        "authenticated table task_types TRUNCATE",
        "anon sequence admin_events_id_seq UPDATE",
        "anon table _sqlx_migrations DELETE",
        "anon table workspace_dashboard SELECT",
    ] {
        assert!(
            held.contains(line),
            "before 0017, expected {line:?} in {held:?}"
        );
    }
    assert_ne!(held, expected);

    let revoked = bizq::db::migrate(&pool).await?;
    assert!(revoked.is_empty(), "0017 enforced already: {revoked:?}");
    let held = tenant_holdings(&pool).await?;
    let (extra, missing) = diff(&held, &expected);
    assert!(
        extra.is_empty() && missing.is_empty(),
        "beyond the list: {extra:#?}\nlisted but not held: {missing:#?}"
    );
    // The table operators read is the same list (gen_random_uuid is PUBLIC's, not listed).
    let mut without_pgcrypto = expected.clone();
    without_pgcrypto.retain(|l| !l.ends_with("function public.gen_random_uuid()"));
    assert_eq!(listed(&pool).await?, without_pgcrypto);
    // Nothing beyond the list, as the engine itself computes it.
    let beyond: i64 =
        sqlx::query_scalar("SELECT count(*) FROM bizq_privileges_beyond_allow_list()")
            .fetch_one(&pool)
            .await?;
    assert_eq!(beyond, 0);

    // A later object nobody listed: the default privileges give it to both roles, and the
    // comparison sees it.
    sqlx::raw_sql(
        "CREATE TABLE tenant_throwaway (id BIGINT GENERATED ALWAYS AS IDENTITY, note TEXT);
         CREATE SEQUENCE tenant_throwaway_seq;
         CREATE FUNCTION tenant_throwaway_fn() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;",
    )
    .execute(&pool)
    .await?;
    let held = tenant_holdings(&pool).await?;
    let (extra, missing) = diff(&held, &expected);
    assert!(missing.is_empty(), "{missing:?}");
    for line in [
        "anon table tenant_throwaway TRUNCATE",
        "authenticated table tenant_throwaway TRIGGER",
        "anon sequence tenant_throwaway_id_seq UPDATE",
        "authenticated sequence tenant_throwaway_seq USAGE",
        "anon function tenant_throwaway_fn()",
    ] {
        assert!(
            extra.contains(&line.to_string()),
            "{line:?} not in {extra:?}"
        );
    }
    assert!(
        extra.iter().all(|l| l.contains("tenant_throwaway")),
        "{extra:?}"
    );

    // The enforce step of `bizq migrate` takes all of it back, and says so.
    let revoked = bizq::db::migrate(&pool).await?;
    assert!(
        revoked.len() >= extra.len()
            && revoked
                .iter()
                .all(|r| r.object_name.contains("tenant_throwaway")),
        "{revoked:?}"
    );
    assert!(
        revoked.iter().any(|r| r.role_name == "anon"
            && r.object_name == "tenant_throwaway"
            && r.privilege == "TRIGGER"),
        "{revoked:?}"
    );
    assert_eq!(tenant_holdings(&pool).await?, expected);
    // Enforced: the next run has nothing to do.
    assert_eq!(bizq::db::migrate(&pool).await?, Vec::new());
    Ok(())
}

/// Pins the attacks of finding 4 under Supabase's default privileges, as anon and as a
/// member: TRUNCATE task_types, a `pg_temp` trigger function put on task_types, setval and
/// nextval on admin_events_id_seq, reading or deleting _sqlx_migrations, reading the
/// dashboard views as anon, and creating a table in public are all refused; the worker's
/// registration upsert, run while the attacker's session still holds its temporary function,
/// leaves the balance alone.
#[sqlx::test(migrations = false)]
async fn under_supabase_defaults_tenants_cannot_touch_engine_objects(
    pool: PgPool,
) -> anyhow::Result<()> {
    supabase_default_privileges(&pool).await?;
    bizq::db::migrate(&pool).await?;
    let tenant = create_tenant(&pool, "victim").await?;
    let balance = || async {
        sqlx::query_scalar::<_, i32>("SELECT credits_balance FROM workspaces WHERE id = $1")
            .bind(tenant.id)
            .fetch_one(&pool)
            .await
    };
    let start = balance().await?;

    let mut conn = connect(&pool).await?;
    for role in ["anon", "authenticated"] {
        if role == "anon" {
            exec(&mut conn, "RESET ROLE").await?;
            exec(&mut conn, "SET ROLE anon").await?;
        } else {
            act_as(&mut conn, tenant.member.auth_id).await?;
        }
        // A temporary function is anyone's to create (TEMP on the database): putting it on an
        // engine table is what must fail.
        exec(
            &mut conn,
            &format!(
                "CREATE FUNCTION pg_temp.bizq_steal_{role}() RETURNS trigger
                 LANGUAGE plpgsql AS $$
                 BEGIN
                   UPDATE workspaces SET credits_balance = 999999;
                   RETURN NEW;
                 END $$"
            ),
        )
        .await?;
        let on_task_types = format!(
            "CREATE TRIGGER bizq_steal BEFORE INSERT OR UPDATE ON task_types
               FOR EACH ROW EXECUTE FUNCTION pg_temp.bizq_steal_{role}()"
        );
        let on_workers = format!(
            "CREATE TRIGGER bizq_steal BEFORE INSERT OR UPDATE ON workers
               FOR EACH ROW EXECUTE FUNCTION pg_temp.bizq_steal_{role}()"
        );
        for sql in [
            "TRUNCATE task_types",
            "INSERT INTO task_types (type) VALUES ('x')",
            &on_task_types,
            &on_workers,
            "SELECT setval('admin_events_id_seq', 9223372036854775807)",
            "SELECT nextval('admin_events_id_seq')",
            "SELECT count(*) FROM _sqlx_migrations",
            "DELETE FROM _sqlx_migrations",
            "SELECT count(*) FROM bizq_tenant_grants",
            "INSERT INTO bizq_tenant_grants (grantee, object_type, object_name, privilege, reason)
             VALUES ('anon', 'table', 'tasks', 'SELECT', 'mine')",
            "SELECT * FROM bizq_enforce_privileges()",
            "CREATE TABLE public.tenant_owned (id int)",
        ] {
            expect_sqlstate(
                exec(&mut conn, sql).await,
                INSUFFICIENT_PRIVILEGE,
                &format!("{role}: {sql}"),
            );
        }
        if role == "anon" {
            expect_sqlstate(
                exec(&mut conn, "SELECT count(*) FROM workspace_dashboard").await,
                INSUFFICIENT_PRIVILEGE,
                "anon reads the dashboard view",
            );
        }
    }
    // The worker starts while that session (and its temporary function) is still there.
    let registered = bizq::task_types::register_types(
        &pool,
        &["ai.generate"],
        None,
        "worker-after-the-attack",
        false,
    )
    .await?;
    assert_eq!(registered, ["ai.generate"]);
    assert_eq!(balance().await?, start);
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'task_types'::regclass",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(triggers, 0);
    drop(conn);
    Ok(())
}

/// Pins the trigger check, for a trigger that got onto an engine table anyway (put there
/// before the enforcement, by hand, by a role that later lost the privilege): one calling a
/// function of another session's temporary schema (the shape of the attack), and one calling
/// a function owned by a tenant role. While either is there the worker's registration upsert
/// does not run (it would run the function with the engine's rights: the balance stays) and
/// `bizq migrate` fails naming it; once it is gone both work again.
#[sqlx::test(migrations = "../migrations")]
async fn no_engine_write_runs_a_foreign_trigger(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_tenant(&pool, "victim").await?.id;
    let balance = || async {
        sqlx::query_scalar::<_, i32>("SELECT credits_balance FROM workspaces WHERE id = $1")
            .bind(ws)
            .fetch_one(&pool)
            .await
    };
    let start = balance().await?;
    let register =
        || bizq::task_types::register_types(&pool, &["ai.generate"], None, "w-trigger-test", false);

    // 1. A temporary function, alive as long as the session that made it.
    let mut attacker = connect(&pool).await?;
    exec(
        &mut attacker,
        "CREATE FUNCTION pg_temp.bizq_steal() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN UPDATE workspaces SET credits_balance = 999999; RETURN NEW; END $$;
         CREATE TRIGGER bizq_steal BEFORE INSERT OR UPDATE ON task_types
           FOR EACH ROW EXECUTE FUNCTION pg_temp.bizq_steal();",
    )
    .await?;
    let err = register()
        .await
        .expect_err("registration ran a foreign trigger");
    let msg = err.to_string();
    assert!(
        matches!(err, bizq::Error::UntrustedTriggers { .. })
            && msg.contains("bizq_steal")
            && msg.contains("task_types"),
        "{msg}"
    );
    assert_eq!(balance().await?, start, "the trigger ran");
    let err = bizq::db::migrate(&pool)
        .await
        .expect_err("enforced past the trigger");
    assert!(
        err.to_string().contains("trigger bizq_steal on task_types"),
        "{err}"
    );
    drop(attacker);
    // The temporary schema goes with its session, and the trigger with it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while register().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the trigger outlived its session"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(balance().await?, start);

    // 2. A function a tenant role owns.
    sqlx::raw_sql(
        "CREATE FUNCTION public.bizq_tenant_fn() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN UPDATE workspaces SET credits_balance = 999999; RETURN NEW; END $$;
         ALTER FUNCTION public.bizq_tenant_fn() OWNER TO authenticated;
         CREATE TRIGGER bizq_tenant_trigger BEFORE INSERT OR UPDATE ON task_types
           FOR EACH ROW EXECUTE FUNCTION public.bizq_tenant_fn();",
    )
    .execute(&pool)
    .await?;
    let err = register()
        .await
        .expect_err("registration ran a tenant's function");
    assert!(err.to_string().contains("owned by authenticated"), "{err}");
    assert_eq!(balance().await?, start, "the trigger ran");
    let err = bizq::db::migrate(&pool)
        .await
        .expect_err("enforced past the trigger");
    assert!(err.to_string().contains("bizq_tenant_trigger"), "{err}");
    sqlx::raw_sql(
        "DROP TRIGGER bizq_tenant_trigger ON task_types; DROP FUNCTION public.bizq_tenant_fn();",
    )
    .execute(&pool)
    .await?;
    register().await?;
    bizq::db::migrate(&pool).await?;
    assert_eq!(balance().await?, start);
    Ok(())
}

/// Every function a member's statement evaluates with the member's own rights — in an RLS
/// policy, a CHECK constraint or a column default of a table `authenticated` may write, or
/// in a view it may read — is executable by `authenticated`, i.e. on the allow-list. A later
/// migration that adds such a function without listing it fails here, not in production
/// (where every insert of the table would fail with "permission denied for function").
#[sqlx::test(migrations = "../migrations")]
async fn functions_tenant_statements_evaluate_are_on_the_allow_list(
    pool: PgPool,
) -> anyhow::Result<()> {
    let unreachable: Vec<(String, String)> = sqlx::query_as(
        "WITH uses AS (
           SELECT d.refobjid AS fn, 'policy ' || pol.polname || ' on ' || c.relname AS used_by
             FROM pg_depend d
             JOIN pg_policy pol ON d.classid = 'pg_policy'::regclass AND pol.oid = d.objid
             JOIN pg_class c ON c.oid = pol.polrelid
            WHERE d.refclassid = 'pg_proc'::regclass
              AND (pol.polroles = '{0}' OR 'authenticated'::regrole = ANY (pol.polroles))
           UNION ALL
           SELECT d.refobjid, 'constraint ' || con.conname || ' on ' || c.relname
             FROM pg_depend d
             JOIN pg_constraint con ON d.classid = 'pg_constraint'::regclass
                                   AND con.oid = d.objid
             JOIN pg_class c ON c.oid = con.conrelid
            WHERE d.refclassid = 'pg_proc'::regclass
              AND (has_any_column_privilege('authenticated', c.oid, 'INSERT')
                   OR has_any_column_privilege('authenticated', c.oid, 'UPDATE'))
           UNION ALL
           SELECT d.refobjid, 'default of ' || c.relname || '.' || a.attname
             FROM pg_depend d
             JOIN pg_attrdef ad ON d.classid = 'pg_attrdef'::regclass AND ad.oid = d.objid
             JOIN pg_class c ON c.oid = ad.adrelid
             JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
            WHERE d.refclassid = 'pg_proc'::regclass
              AND has_any_column_privilege('authenticated', c.oid, 'INSERT')
           UNION ALL
           SELECT d.refobjid, 'view ' || c.relname
             FROM pg_depend d
             JOIN pg_rewrite rw ON d.classid = 'pg_rewrite'::regclass AND rw.oid = d.objid
             JOIN pg_class c ON c.oid = rw.ev_class
            WHERE d.refclassid = 'pg_proc'::regclass
              AND c.relkind IN ('v', 'm')
              AND has_table_privilege('authenticated', c.oid, 'SELECT')
         )
         SELECT DISTINCT u.fn::regprocedure::text, u.used_by
           FROM uses u
          WHERE NOT has_function_privilege('authenticated', u.fn, 'EXECUTE')
          ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await?;
    assert!(
        unreachable.is_empty(),
        "functions a member's statements run but may not execute (add them to \
         bizq_tenant_grants): {unreachable:?}"
    );
    // The query sees what it should: the policies' helpers are among the uses.
    let seen: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_depend d JOIN pg_policy pol ON pol.oid = d.objid
          WHERE d.classid = 'pg_policy'::regclass
            AND d.refobjid = 'current_user_workspace()'::regprocedure",
    )
    .fetch_one(&pool)
    .await?;
    assert!(seen >= 10, "{seen}");
    Ok(())
}
