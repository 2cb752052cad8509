//! The schema migrations create every object of the schema document and are idempotent.

use std::collections::BTreeSet;

use bizq_tests::schema_support::{TABLES, create_tenant, migrations_dir, seed_rows};
use sqlx::{AssertSqlSafe, PgPool};

/// Every migration file, in the order sqlx applies them, so a new one is covered as well.
fn migration_files() -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(migrations_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    anyhow::ensure!(
        files.len() >= 6,
        "expected the six migrations, found {files:?}"
    );
    Ok(files)
}

async fn names(pool: &PgPool, sql: &'static str) -> anyhow::Result<BTreeSet<String>> {
    Ok(sqlx::query_scalar(sql)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect())
}

/// Everything in the catalog the migrations create, plus table contents counts.
async fn fingerprint(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    let sql = "
      SELECT 'rel ' || c.relkind::text || ' ' || c.relname || ' acl=' || coalesce((SELECT string_agg(a::text, ',' ORDER BY a::text) FROM unnest(c.relacl) a), '') || ' rls=' || c.relrowsecurity
        FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
      UNION ALL
      SELECT 'con ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
      UNION ALL
      SELECT 'pol ' || tablename || ' ' || policyname || ' ' || cmd || ' ' || coalesce(qual, '') || ' ' || coalesce(with_check, '')
        FROM pg_policies WHERE schemaname = 'public'
      UNION ALL
      SELECT 'trg ' || tgrelid::regclass || ' ' || tgname FROM pg_trigger WHERE NOT tgisinternal
      UNION ALL
      SELECT 'fn ' || p.oid::regprocedure || ' acl=' || coalesce((SELECT string_agg(a::text, ',' ORDER BY a::text) FROM unnest(p.proacl) a), '') || ' ' || md5(p.prosrc)
        FROM pg_proc p WHERE p.pronamespace IN ('public'::regnamespace, 'auth'::regnamespace)
      UNION ALL
      SELECT 'view ' || viewname || ' ' || md5(definition) FROM pg_views WHERE schemaname = 'public'
      UNION ALL
      SELECT 'ext ' || extname FROM pg_extension
      UNION ALL
      SELECT 'colacl ' || table_name || '.' || column_name || ' ' || grantee || ' ' || privilege_type
        FROM information_schema.column_privileges WHERE table_schema = 'public'
      UNION ALL
      SELECT 'col ' || table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '')
        FROM information_schema.columns WHERE table_schema = 'public'
      UNION ALL
      SELECT 'rows workspaces ' || count(*) FROM workspaces
      UNION ALL
      SELECT 'rows analytics_events ' || count(*) FROM analytics_events
      UNION ALL
      SELECT 'rows stores ' || string_agg(credentials::text, ',') FROM stores
      ORDER BY 1";
    Ok(sqlx::query_scalar(sql).fetch_all(pool).await?)
}

#[sqlx::test(migrations = "../migrations")]
async fn all_schema_objects_exist(pool: PgPool) -> anyhow::Result<()> {
    let tables = names(
        &pool,
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p') AND NOT relispartition",
    )
    .await?;
    for t in TABLES {
        assert!(tables.contains(t), "table {t} missing");
    }

    let rls = names(
        &pool,
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relrowsecurity",
    )
    .await?;
    for t in TABLES {
        assert!(rls.contains(t), "RLS not enabled on {t}");
    }

    let partitions = names(
        &pool,
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'analytics_events'::regclass",
    )
    .await?;
    let now = chrono::Utc::now();
    let current = format!("analytics_events_y{}", now.format("%Ym%m"));
    assert!(
        partitions.contains("analytics_events_default"),
        "{partitions:?}"
    );
    assert!(
        partitions.contains(&current),
        "{current} missing from {partitions:?}"
    );

    let policies = names(
        &pool,
        "SELECT tablename || '.' || policyname FROM pg_policies WHERE schemaname = 'public'",
    )
    .await?;
    for p in [
        "workspaces.workspace_access",
        "users.user_workspace_access",
        "tasks.task_workspace_access",
        "stores.store_workspace_access",
        "products.product_workspace_access",
        "product_variants.product_variant_workspace_access",
        "customers.customer_workspace_access",
        "orders.order_workspace_access",
        "content_projects.content_project_workspace_access",
        "analytics_events.analytics_event_workspace_access",
    ] {
        assert!(policies.contains(p), "policy {p} missing");
    }
    // Every table has a policy for every command it grants to `authenticated`.
    let gaps = names(
        &pool,
        "SELECT t.relname || ':' || priv
         FROM pg_class t CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) priv
         WHERE t.relnamespace = 'public'::regnamespace AND t.relkind IN ('r', 'p') AND NOT t.relispartition
           AND has_table_privilege('authenticated', t.oid, priv)
           AND NOT EXISTS (SELECT 1 FROM pg_policies p WHERE p.schemaname = 'public' AND p.tablename = t.relname
                           AND p.cmd IN (priv, 'ALL'))",
    )
    .await?;
    assert!(gaps.is_empty(), "granted but no policy: {gaps:?}");

    let triggers = names(
        &pool,
        "SELECT tgrelid::regclass || '.' || tgname FROM pg_trigger WHERE NOT tgisinternal",
    )
    .await?;
    for t in [
        "workspaces.update_workspaces_updated_at",
        "users.update_users_updated_at",
        "tasks.update_tasks_updated_at",
        "stores.update_stores_updated_at",
        "products.update_products_updated_at",
        "product_variants.update_product_variants_updated_at",
        "customers.update_customers_updated_at",
        "orders.update_orders_updated_at",
        "content_projects.update_content_projects_updated_at",
        "orders.update_customer_metrics_trigger",
        "tasks.deduct_task_credits_trigger",
        "stores.encrypt_store_credentials_trigger",
        "workspaces.protect_workspace_billing_trigger",
        "users.protect_user_privileges_trigger",
    ] {
        assert!(triggers.contains(t), "trigger {t} missing");
    }

    let views = names(
        &pool,
        "SELECT viewname::text FROM pg_views WHERE schemaname = 'public'",
    )
    .await?;
    for v in ["workspace_dashboard", "task_performance"] {
        assert!(views.contains(v), "view {v} missing");
    }
    let invoker = names(
        &pool,
        "SELECT relname::text FROM pg_class WHERE relkind = 'v' AND 'security_invoker=true' = ANY(reloptions)",
    )
    .await?;
    assert!(
        invoker.contains("workspace_dashboard") && invoker.contains("task_performance"),
        "{invoker:?}"
    );

    let functions = names(
        &pool,
        "SELECT n.nspname || '.' || p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname IN ('public', 'auth')",
    )
    .await?;
    for f in [
        "auth.uid",
        "auth.jwt",
        "auth.role",
        "public.current_user_workspace",
        "public.current_user_role",
        "public.user_has_role",
        "public.user_can_access_workspace",
        "public.user_can_write",
        "public.update_updated_at_column",
        "public.update_customer_metrics",
        "public.deduct_task_credits",
        "public.ensure_analytics_partitions",
        "public.store_credentials",
    ] {
        assert!(functions.contains(f), "function {f} missing");
    }

    let roles = names(&pool, "SELECT rolname::text FROM pg_roles").await?;
    for r in ["anon", "authenticated", "service_role"] {
        assert!(roles.contains(r), "role {r} missing");
    }
    let bypass: bool =
        sqlx::query_scalar("SELECT rolbypassrls FROM pg_roles WHERE rolname = 'service_role'")
            .fetch_one(&pool)
            .await?;
    assert!(bypass);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn rerunning_every_schema_migration_changes_nothing(pool: PgPool) -> anyhow::Result<()> {
    // Some data, so that a re-run that drops/recreates/re-encrypts would show.
    let tenant = create_tenant(&pool, "rerun").await?;
    seed_rows(&pool, &tenant).await?;
    let before = fingerprint(&pool).await?;
    assert!(
        before.len() > 300,
        "fingerprint suspiciously small: {}",
        before.len()
    );

    for path in migration_files()? {
        let name = path.display();
        let sql = std::fs::read_to_string(&path)?;
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("re-running {name}: {e}"))?;
    }

    let after = fingerprint(&pool).await?;
    let added: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
    let removed: Vec<_> = before.iter().filter(|l| !after.contains(l)).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "re-run changed the database:\n+ {added:?}\n- {removed:?}"
    );
    Ok(())
}

/// Migration 0017 on a database that already holds UUID-shaped slugs (an owner set its slug
/// to another workspace's id; another spelled a UUID in braces and capitals): it does not
/// fail, renames each to `renamed-<its own id>` (with a suffix when that is taken), records
/// every rename in admin_events, leaves other slugs alone, and from then on the CHECK refuses
/// UUID-shaped slugs.
#[sqlx::test(migrations = false)]
async fn migration_0017_renames_uuid_shaped_slugs(pool: PgPool) -> anyhow::Result<()> {
    let before = bizq::db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| *v < 17)
        .max()
        .expect("migrations before 0017");
    bizq::db::MIGRATOR.run_to(before, &pool).await?;
    let insert = |slug: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, uuid::Uuid>(
                "INSERT INTO workspaces (name, slug) VALUES ('w', $1) RETURNING id",
            )
            .bind(slug)
            .fetch_one(&pool)
            .await
        }
    };
    let victim = insert("victim".into()).await?;
    let attacker = insert("attacker".into()).await?;
    let braces = insert(format!(
        "{{{}}}",
        uuid::Uuid::new_v4().to_string().to_uppercase()
    ))
    .await?;
    // The first name the rename would pick for the attacker is taken already.
    let collider = insert(format!("renamed-{attacker}")).await?;
    sqlx::query("UPDATE workspaces SET slug = $1::text WHERE id = $2")
        .bind(victim)
        .bind(attacker)
        .execute(&pool)
        .await?;

    bizq::db::migrate(&pool).await?;

    let slugs: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, slug FROM workspaces ORDER BY created_at, id")
            .fetch_all(&pool)
            .await?;
    let slug_of = |id: uuid::Uuid| {
        slugs
            .iter()
            .find(|(w, _)| *w == id)
            .map(|(_, s)| s.clone())
            .expect("workspace kept")
    };
    assert_eq!(slug_of(victim), "victim");
    assert_eq!(slug_of(attacker), format!("renamed-{attacker}-2"));
    assert_eq!(slug_of(braces), format!("renamed-{braces}"));
    assert_eq!(slug_of(collider), format!("renamed-{attacker}"));
    let events: Vec<(String, String, serde_json::Value)> =
        sqlx::query_as("SELECT actor, action, target FROM admin_events ORDER BY id")
            .fetch_all(&pool)
            .await?;
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events
            .iter()
            .all(|(actor, action, _)| actor == "migration 0017" && action == "rename_uuid_slug")
    );
    assert!(
        events
            .iter()
            .any(|(_, _, t)| t["workspace"] == attacker.to_string()
                && t["old_slug"] == victim.to_string()
                && t["new_slug"] == format!("renamed-{attacker}-2"))
    );
    let refused = sqlx::query("UPDATE workspaces SET slug = $1::text WHERE id = $2")
        .bind(victim)
        .bind(attacker)
        .execute(&pool)
        .await;
    let msg = bizq_tests::schema_support::expect_sqlstate(refused, "23514", "a UUID slug");
    assert!(msg.contains("workspaces_slug_not_uuid"), "{msg}");
    Ok(())
}
