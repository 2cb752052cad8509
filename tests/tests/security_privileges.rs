//! Privileges are explicit (issue 8, attack 8, and the timeouts of attack 5): with Supabase's
//! default privileges (ALL on new tables and functions for `anon` and `authenticated`), the
//! engine's tables stay closed to tenants, no function is executable by them beyond an exact
//! list, pgcrypto is not theirs, functions created later are not executable by PUBLIC, and
//! `authenticated` has statement and idle-in-transaction timeouts. Pinned by the privilege and
//! ALTER ROLE sections of migration 0009.

use bizq_tests::schema_support::{act_as, connect, create_tenant, exec, expect_sqlstate};
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
    assert_eq!(executable_by(&pool, "anon").await?, tenant_helpers);
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
