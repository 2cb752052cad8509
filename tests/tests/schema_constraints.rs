//! Every CHECK constraint rejects a bad value (driven from pg_constraint, so a new CHECK cannot
//! go untested), plus NOT NULL fixes, tenant-consistent foreign keys and ON DELETE actions.

use std::collections::BTreeSet;

use bizq_tests::schema_support::{TABLES, create_tenant, create_user, expect_sqlstate, seed_rows};
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

/// (table, constraint, an UPDATE that violates only that constraint). Every table holds
/// exactly one seeded row, so the UPDATEs have no WHERE clause.
const CASES: &[(&str, &str, &str)] = &[
    (
        "workspaces",
        "workspaces_plan_check",
        "UPDATE workspaces SET plan = 'platinum'",
    ),
    (
        "workspaces",
        "workspaces_subscription_status_check",
        "UPDATE workspaces SET subscription_status = 'lapsed'",
    ),
    (
        "workspaces",
        "valid_credits",
        "UPDATE workspaces SET credits_balance = -1",
    ),
    (
        "workspaces",
        "valid_monthly_limit",
        "UPDATE workspaces SET monthly_credit_limit = 0",
    ),
    (
        "workspaces",
        "valid_credits_used",
        "UPDATE workspaces SET credits_used_this_month = -1",
    ),
    (
        "workspaces",
        "valid_credits_overdrawn",
        "UPDATE workspaces SET credits_overdrawn = -1",
    ),
    (
        "workspaces",
        "valid_timezone",
        "UPDATE workspaces SET timezone = 'Mars/Olympus_Mons'",
    ),
    (
        "users",
        "users_role_check",
        "UPDATE users SET role = 'superuser'",
    ),
    (
        "tasks",
        "tasks_status_check",
        "UPDATE tasks SET status = 'done'",
    ),
    (
        "tasks",
        "tasks_worker_type_check",
        "UPDATE tasks SET worker_type = 'robot'",
    ),
    ("tasks", "valid_priority", "UPDATE tasks SET priority = 11"),
    // Provider rate budgets (migration 0010): known dimensions, a bucket never above its
    // burst, slots held with an expiry.
    (
        "provider_budgets",
        "provider_budgets_dimension",
        "INSERT INTO provider_budgets (provider, dimension) VALUES ('p', 'dollars')",
    ),
    (
        "provider_budgets",
        "provider_budgets_bucket",
        "INSERT INTO provider_budgets (provider, dimension, capacity, burst, tokens)
         VALUES ('p', 'requests', 60, 1, 2)",
    ),
    (
        "provider_slots",
        "provider_slots_slot",
        "INSERT INTO provider_slots (provider, slot) VALUES ('p', -1)",
    ),
    (
        "provider_slots",
        "provider_slots_held",
        "INSERT INTO provider_slots (provider, slot, holder) VALUES ('p', 0, gen_random_uuid())",
    ),
    // Task types workers serve (0012) and live workers (0013).
    (
        "task_types",
        "task_types_worker_kind_check",
        "INSERT INTO task_types (type, worker_kind) VALUES ('t', 'robot')",
    ),
    (
        "workers",
        "workers_role_check",
        "INSERT INTO workers (id, role, host, pid, version) VALUES ('w', 'janitor', 'h', 1, 'v')",
    ),
    (
        "workers",
        "workers_state_check",
        "INSERT INTO workers (id, role, host, pid, version, state)
         VALUES ('w', 'worker', 'h', 1, 'v', 'asleep')",
    ),
    // Engine-only settings (migration 0009): one row, limits positive.
    (
        "bizq_limits",
        "bizq_limits_singleton_check",
        "INSERT INTO bizq_limits (singleton) VALUES (FALSE)",
    ),
    (
        "bizq_limits",
        "bizq_limits_max_input_bytes_check",
        "UPDATE bizq_limits SET max_input_bytes = 0",
    ),
    (
        "bizq_limits",
        "bizq_limits_max_depends_on_check",
        "UPDATE bizq_limits SET max_depends_on = -1",
    ),
    (
        "bizq_limits",
        "bizq_limits_max_chain_depth_check",
        "UPDATE bizq_limits SET max_chain_depth = 0",
    ),
    (
        "bizq_limits",
        "bizq_limits_max_dependents_check",
        "UPDATE bizq_limits SET max_dependents = -1",
    ),
    (
        "bizq_credentials_keyring",
        "bizq_credentials_keyring_singleton_check",
        "INSERT INTO bizq_credentials_keyring (singleton, fingerprint) VALUES (FALSE, 'x')",
    ),
    (
        "tasks",
        "valid_quality_score",
        "UPDATE tasks SET quality_score = 5.01",
    ),
    (
        "tasks",
        "valid_estimated_cost",
        "UPDATE tasks SET estimated_cost = -1",
    ),
    (
        "tasks",
        "valid_actual_cost",
        "UPDATE tasks SET actual_cost = -1",
    ),
    (
        "tasks",
        "valid_processing_time",
        "UPDATE tasks SET processing_time_ms = -1",
    ),
    (
        "tasks",
        "tasks_not_own_parent",
        "UPDATE tasks SET parent_task_id = id",
    ),
    (
        "stores",
        "stores_platform_check",
        "UPDATE stores SET platform = 'ebay'",
    ),
    (
        "stores",
        "stores_status_check",
        "UPDATE stores SET status = 'broken'",
    ),
    (
        "stores",
        "stores_sync_status_check",
        "UPDATE stores SET sync_status = 'stuck'",
    ),
    (
        "products",
        "products_status_check",
        "UPDATE products SET status = 'deleted'",
    ),
    (
        "products",
        "valid_price",
        "UPDATE products SET price = -0.01",
    ),
    (
        "products",
        "valid_inventory",
        "UPDATE products SET inventory_quantity = -1",
    ),
    (
        "product_variants",
        "valid_variant_price",
        "UPDATE product_variants SET price = -0.01",
    ),
    (
        "product_variants",
        "valid_variant_inventory",
        "UPDATE product_variants SET inventory_quantity = -1",
    ),
    (
        "customers",
        "customers_status_check",
        "UPDATE customers SET status = 'vip'",
    ),
    (
        "customers",
        "valid_total_spent",
        "UPDATE customers SET total_spent = -1",
    ),
    (
        "customers",
        "valid_lifetime_value",
        "UPDATE customers SET lifetime_value = -1",
    ),
    (
        "customers",
        "valid_churn_risk",
        "UPDATE customers SET churn_risk_score = 1.01",
    ),
    (
        "customers",
        "valid_total_orders",
        "UPDATE customers SET total_orders = -1",
    ),
    (
        "orders",
        "orders_status_check",
        "UPDATE orders SET status = 'lost'",
    ),
    (
        "orders",
        "orders_fulfillment_status_check",
        "UPDATE orders SET fulfillment_status = 'teleported'",
    ),
    (
        "orders",
        "orders_payment_status_check",
        "UPDATE orders SET payment_status = 'iou'",
    ),
    (
        "orders",
        "valid_total_amount",
        "UPDATE orders SET total_amount = -1",
    ),
    (
        "orders",
        "valid_tax_amount",
        "UPDATE orders SET tax_amount = -1",
    ),
    (
        "orders",
        "valid_shipping_amount",
        "UPDATE orders SET shipping_amount = -1",
    ),
    (
        "orders",
        "valid_discount_amount",
        "UPDATE orders SET discount_amount = -1",
    ),
    (
        "content_projects",
        "content_projects_content_type_check",
        "UPDATE content_projects SET content_type = 'poem'",
    ),
    (
        "content_projects",
        "content_projects_status_check",
        "UPDATE content_projects SET status = 'lost'",
    ),
    (
        "content_projects",
        "valid_seo_score",
        "UPDATE content_projects SET seo_score = 101",
    ),
    (
        "content_projects",
        "valid_readability_score",
        "UPDATE content_projects SET readability_score = -1",
    ),
    // Added by the queue engine (0006_queue_engine.sql).
    (
        "workspaces",
        "valid_credits_reserved",
        "UPDATE workspaces SET credits_reserved = -1",
    ),
    ("tasks", "valid_attempt", "UPDATE tasks SET attempt = -1"),
    // Added by 0017_privileges_allow_list.sql.
    (
        "workspaces",
        "workspaces_slug_not_uuid",
        "UPDATE workspaces SET slug = '{' || upper(id::text) || '}'",
    ),
    (
        "bizq_tenant_grants",
        "bizq_tenant_grants_grantee",
        "INSERT INTO bizq_tenant_grants (grantee, object_type, object_name, privilege, reason)
         VALUES ('service_role', 'table', 'orders', 'SELECT', 'x')",
    ),
    (
        "bizq_tenant_grants",
        "bizq_tenant_grants_object_type",
        "INSERT INTO bizq_tenant_grants (grantee, object_type, object_name, privilege, reason)
         VALUES ('authenticated', 'database', 'orders', 'SELECT', 'x')",
    ),
    (
        "bizq_tenant_grants",
        "bizq_tenant_grants_privilege",
        "INSERT INTO bizq_tenant_grants (grantee, object_type, object_name, privilege, reason)
         VALUES ('anon', 'table', 'task_types', 'TRUNCATE', 'x')",
    ),
    (
        "bizq_tenant_grants",
        "bizq_tenant_grants_columns",
        "INSERT INTO bizq_tenant_grants (grantee, object_type, object_name, privilege, columns,
                                         reason)
         VALUES ('authenticated', 'table', 'orders', 'DELETE', ARRAY['id'], 'x')",
    ),
    (
        "tasks",
        "valid_max_attempts",
        "UPDATE tasks SET max_attempts = 0",
    ),
    (
        "tasks",
        "valid_reserved_credits",
        "UPDATE tasks SET reserved_credits = -1",
    ),
];

#[sqlx::test(migrations = "../migrations")]
async fn every_check_constraint_is_covered_and_enforced(pool: PgPool) -> anyhow::Result<()> {
    // Every CHECK constraint declared on any table of the public schema, read from the
    // catalog (no table list: a new table's CHECKs cannot escape). Constraints a partition
    // inherits from its parent are the parent's (conislocal = false) and are tested there; a
    // CHECK declared on a partition itself would be listed.
    let in_catalog: BTreeSet<(String, String)> = sqlx::query_as(
        "SELECT r.relname::text, c.conname::text
           FROM pg_constraint c
           JOIN pg_class r ON r.oid = c.conrelid
          WHERE c.contype = 'c'
            AND c.conislocal
            AND r.relnamespace = 'public'::regnamespace
            AND r.relkind IN ('r', 'p')",
    )
    .fetch_all(&pool)
    .await?
    .into_iter()
    .collect();
    let covered: BTreeSet<(String, String)> = CASES
        .iter()
        .map(|(t, c, _)| (t.to_string(), c.to_string()))
        .collect();
    let untested: Vec<_> = in_catalog.difference(&covered).collect();
    assert!(
        untested.is_empty(),
        "CHECK constraints without a case in CASES (schema_constraints.rs): {untested:?}"
    );
    let stale: Vec<_> = covered.difference(&in_catalog).collect();
    assert!(
        stale.is_empty(),
        "cases for constraints that do not exist: {stale:?}"
    );

    let tenant = create_tenant(&pool, "checks").await?;
    // Exactly one row per table: keep only the member in users.
    sqlx::query("DELETE FROM users WHERE id <> $1")
        .bind(tenant.member.user_id)
        .execute(&pool)
        .await?;
    seed_rows(&pool, &tenant).await?;

    for (table, constraint, sql) in CASES {
        let r = sqlx::query(*sql).execute(&pool).await;
        let msg = expect_sqlstate(r, "23514", &format!("{table}.{constraint}: {sql}"));
        assert!(
            msg.contains(constraint),
            "{table}.{constraint}: error does not name it: {msg}"
        );
    }
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn not_null_fixes(pool: PgPool) -> anyhow::Result<()> {
    let tenant = create_tenant(&pool, "not-null").await?;
    seed_rows(&pool, &tenant).await?;
    for sql in [
        "UPDATE tasks SET priority = NULL",
        "UPDATE tasks SET depends_on = NULL",
        "UPDATE tasks SET blocks = NULL",
        "UPDATE workspaces SET subscription_status = NULL",
        "UPDATE workspaces SET credits_used_this_month = NULL",
        "UPDATE workspaces SET monthly_credit_limit = NULL",
        "UPDATE products SET status = NULL",
        "UPDATE customers SET total_spent = NULL",
    ] {
        expect_sqlstate(sqlx::query(sql).execute(&pool).await, "23502", sql);
    }
    let (priority, depends): (i32, Vec<Uuid>) =
        sqlx::query_as("SELECT priority, depends_on FROM tasks LIMIT 1")
            .fetch_one(&pool)
            .await?;
    assert_eq!((priority, depends.len()), (5, 0));
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn references_stay_inside_the_tenant(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "fk-a").await?;
    let b = create_tenant(&pool, "fk-b").await?;
    let rows_a = seed_rows(&pool, &a).await?;
    let rows_b = seed_rows(&pool, &b).await?;

    let cross = [
        format!(
            "INSERT INTO product_variants (workspace_id, product_id) VALUES ('{}', '{}')",
            a.id, rows_b["products"]
        ),
        format!(
            "INSERT INTO orders (workspace_id, customer_id, external_id, total_amount, status, order_date, line_items)
             VALUES ('{}', '{}', 'x', 1, 'pending', now(), '[]')",
            a.id, rows_b["customers"]
        ),
        format!("UPDATE orders SET store_id = '{}' WHERE id = '{}'", rows_b["stores"], rows_a["orders"]),
        format!("UPDATE tasks SET assigned_to = '{}' WHERE id = '{}'", b.member.user_id, rows_a["tasks"]),
        format!("UPDATE tasks SET parent_task_id = '{}' WHERE id = '{}'", rows_b["tasks"], rows_a["tasks"]),
        format!("UPDATE products SET store_id = '{}' WHERE id = '{}'", rows_b["stores"], rows_a["products"]),
        format!("UPDATE content_projects SET created_by = '{}' WHERE id = '{}'", b.owner.user_id, rows_a["content_projects"]),
        format!("UPDATE analytics_events SET order_id = '{}' WHERE id = '{}'", rows_b["orders"], rows_a["analytics_events"]),
    ];
    for sql in cross {
        expect_sqlstate(
            sqlx::query(AssertSqlSafe(sql.clone())).execute(&pool).await,
            "23503",
            &sql,
        );
    }
    Ok(())
}

/// user_id, task_id, order_id, customer_id, product_id of an analytics event.
type EventRefs = (
    Option<Uuid>,
    Option<Uuid>,
    Option<Uuid>,
    Option<Uuid>,
    Option<Uuid>,
);

#[sqlx::test(migrations = "../migrations")]
async fn deletes_do_not_fail_and_keep_history(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "delete").await?;
    let rows = seed_rows(&pool, &a).await?;
    let creator = create_user(&pool, a.id, "member").await?;
    sqlx::query("UPDATE tasks SET created_by = $1, assigned_to = $1 WHERE id = $2")
        .bind(creator.user_id)
        .bind(rows["tasks"])
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE content_projects SET created_by = $1 WHERE id = $2")
        .bind(creator.user_id)
        .bind(rows["content_projects"])
        .execute(&pool)
        .await?;
    sqlx::query(
        "UPDATE analytics_events SET user_id = $1, task_id = $2, order_id = $3, customer_id = $4, product_id = $5 WHERE id = $6",
    )
    .bind(creator.user_id)
    .bind(rows["tasks"])
    .bind(rows["orders"])
    .bind(rows["customers"])
    .bind(rows["products"])
    .bind(rows["analytics_events"])
    .execute(&pool)
    .await?;

    // Deleting a user keeps their tasks, content and events.
    sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(creator.user_id)
        .execute(&pool)
        .await?;
    let (created_by, assigned_to): (Option<Uuid>, Option<Uuid>) =
        sqlx::query_as("SELECT created_by, assigned_to FROM tasks WHERE id = $1")
            .bind(rows["tasks"])
            .fetch_one(&pool)
            .await?;
    assert_eq!((created_by, assigned_to), (None, None));

    // Deleting a customer and a store keeps the order (financial history).
    sqlx::query("DELETE FROM customers WHERE id = $1")
        .bind(rows["customers"])
        .execute(&pool)
        .await?;
    sqlx::query("DELETE FROM stores WHERE id = $1")
        .bind(rows["stores"])
        .execute(&pool)
        .await?;
    let (store, customer, ws): (Option<Uuid>, Option<Uuid>, Uuid) =
        sqlx::query_as("SELECT store_id, customer_id, workspace_id FROM orders WHERE id = $1")
            .bind(rows["orders"])
            .fetch_one(&pool)
            .await?;
    assert_eq!((store, customer, ws), (None, None, a.id));
    // The store's products go with it (as in the seed); events survive with references nulled.
    sqlx::query("DELETE FROM orders WHERE id = $1")
        .bind(rows["orders"])
        .execute(&pool)
        .await?;
    sqlx::query("DELETE FROM tasks WHERE id = $1")
        .bind(rows["tasks"])
        .execute(&pool)
        .await?;
    let refs: EventRefs = sqlx::query_as(
        "SELECT user_id, task_id, order_id, customer_id, product_id FROM analytics_events WHERE id = $1",
    )
    .bind(rows["analytics_events"])
    .fetch_one(&pool)
    .await?;
    assert_eq!(refs, (None, None, None, None, None));

    // Deleting the workspace removes everything of it.
    sqlx::query("DELETE FROM workspaces WHERE id = $1")
        .bind(a.id)
        .execute(&pool)
        .await?;
    for table in TABLES {
        let col = if table == "workspaces" {
            "id"
        } else {
            "workspace_id"
        };
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE {col} = $1"
        )))
        .bind(a.id)
        .fetch_one(&pool)
        .await?;
        assert_eq!(n, 0, "{table} rows left after deleting the workspace");
    }
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn updated_at_is_maintained_on_every_table(pool: PgPool) -> anyhow::Result<()> {
    let tenant = create_tenant(&pool, "updated-at").await?;
    let rows = seed_rows(&pool, &tenant).await?;
    let with_updated_at: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND column_name = 'updated_at' AND table_name = ANY($1)",
    )
    .bind(TABLES.iter().map(|t| t.to_string()).collect::<Vec<_>>())
    .fetch_all(&pool)
    .await?;
    assert_eq!(with_updated_at.len(), 9);
    for table in with_updated_at {
        let id = rows[table.as_str()];
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET updated_at = '2000-01-01' WHERE id = $1"
        )))
        .bind(id)
        .execute(&pool)
        .await?;
        let stale: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT updated_at < now() - interval '1 day' FROM {table} WHERE id = $1"
        )))
        .bind(id)
        .fetch_one(&pool)
        .await?;
        assert!(!stale, "{table}.updated_at not maintained by a trigger");
    }
    Ok(())
}
