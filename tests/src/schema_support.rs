//! Helpers for the schema tests (`tests/tests/schema_*.rs`): create tenants and users, seed one
//! row in every workspace-scoped table, and act as a Supabase-style role on a connection.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use uuid::Uuid;

/// Key used for `bizq.credentials_key` in tests.
pub const CREDENTIALS_KEY: &str = "test-credentials-key-0123456789";

/// The ten tables of the schema document, in dependency order.
pub const TABLES: [&str; 10] = [
    "workspaces",
    "users",
    "tasks",
    "stores",
    "products",
    "product_variants",
    "customers",
    "orders",
    "content_projects",
    "analytics_events",
];

/// A user row plus the auth identity (`auth.uid()`) that logs in as it.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    pub user_id: Uuid,
    pub auth_id: Uuid,
}

/// A workspace with one user of each role.
#[derive(Debug, Clone, Copy)]
pub struct Tenant {
    pub id: Uuid,
    pub owner: Member,
    pub admin: Member,
    pub member: Member,
    pub viewer: Member,
}

/// Creates a workspace (as the pool's superuser) and returns its id.
pub async fn create_workspace(pool: &PgPool, slug: &str) -> Result<Uuid> {
    let id = sqlx::query_scalar("INSERT INTO workspaces (name, slug) VALUES ($1, $1) RETURNING id")
        .bind(slug)
        .fetch_one(pool)
        .await
        .context("insert workspace")?;
    Ok(id)
}

/// Creates a user with `role` in `workspace` linked to a fresh auth identity.
pub async fn create_user(pool: &PgPool, workspace: Uuid, role: &str) -> Result<Member> {
    let auth_id = Uuid::new_v4();
    let user_id = sqlx::query_scalar(
        "INSERT INTO users (workspace_id, email, full_name, role, auth_user_id)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(workspace)
    .bind(format!("{role}-{auth_id}@example.com"))
    .bind(format!("Test {role}"))
    .bind(role)
    .bind(auth_id)
    .fetch_one(pool)
    .await
    .context("insert user")?;
    Ok(Member { user_id, auth_id })
}

/// Creates a workspace with an owner, an admin, a member and a viewer.
pub async fn create_tenant(pool: &PgPool, slug: &str) -> Result<Tenant> {
    let id = create_workspace(pool, slug).await?;
    Ok(Tenant {
        id,
        owner: create_user(pool, id, "owner").await?,
        admin: create_user(pool, id, "admin").await?,
        member: create_user(pool, id, "member").await?,
        viewer: create_user(pool, id, "viewer").await?,
    })
}

/// Creates a task in `workspace` with the given estimated cost; returns its id.
pub async fn create_task(
    pool: &PgPool,
    workspace: Uuid,
    estimated_cost: Option<i32>,
) -> Result<Uuid> {
    let id = sqlx::query_scalar(
        "INSERT INTO tasks (workspace_id, type, category, name, input, estimated_cost)
         VALUES ($1, 'content.write_blog_post', 'content', 'test task', '{}', $2) RETURNING id",
    )
    .bind(workspace)
    .bind(estimated_cost)
    .fetch_one(pool)
    .await
    .context("insert task")?;
    Ok(id)
}

/// Inserts a store with `credentials` (encrypted by the trigger, using [`CREDENTIALS_KEY`]).
pub async fn create_store(
    pool: &PgPool,
    workspace: Uuid,
    credentials: serde_json::Value,
) -> Result<Uuid> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('bizq.credentials_key', $1, true)")
        .bind(CREDENTIALS_KEY)
        .execute(&mut *tx)
        .await?;
    let id = sqlx::query_scalar(
        "INSERT INTO stores (workspace_id, name, platform, store_url, credentials)
         VALUES ($1, 'Test store', 'shopify', 'https://' || gen_random_uuid() || '.example.com', $2)
         RETURNING id",
    )
    .bind(workspace)
    .bind(credentials)
    .fetch_one(&mut *tx)
    .await
    .context("insert store")?;
    tx.commit().await?;
    Ok(id)
}

/// Seeds one row in every workspace-scoped table of `tenant` (as superuser) and returns
/// table name -> id of that row. For `workspaces` it is the workspace itself, for `users` the
/// member's row.
pub async fn seed_rows(pool: &PgPool, tenant: &Tenant) -> Result<BTreeMap<&'static str, Uuid>> {
    let ws = tenant.id;
    let mut rows = BTreeMap::new();
    rows.insert("workspaces", ws);
    rows.insert("users", tenant.member.user_id);
    rows.insert("tasks", create_task(pool, ws, Some(1)).await?);
    let store = create_store(pool, ws, serde_json::json!({"api_key": "seed"})).await?;
    rows.insert("stores", store);
    let product: Uuid = sqlx::query_scalar(
        "INSERT INTO products (workspace_id, store_id, name, price) VALUES ($1, $2, 'Product', 10) RETURNING id",
    )
    .bind(ws)
    .bind(store)
    .fetch_one(pool)
    .await?;
    rows.insert("products", product);
    rows.insert(
        "product_variants",
        sqlx::query_scalar(
            "INSERT INTO product_variants (workspace_id, product_id, sku, price) VALUES ($1, $2, 'SKU-1', 10) RETURNING id",
        )
        .bind(ws)
        .bind(product)
        .fetch_one(pool)
        .await?,
    );
    let customer: Uuid = sqlx::query_scalar(
        "INSERT INTO customers (workspace_id, email) VALUES ($1, 'customer-' || gen_random_uuid() || '@example.com') RETURNING id",
    )
    .bind(ws)
    .fetch_one(pool)
    .await?;
    rows.insert("customers", customer);
    rows.insert(
        "orders",
        sqlx::query_scalar(
            "INSERT INTO orders (workspace_id, store_id, customer_id, external_id, total_amount, status, order_date, line_items)
             VALUES ($1, $2, $3, gen_random_uuid()::text, 25, 'confirmed', now(), '[]') RETURNING id",
        )
        .bind(ws)
        .bind(store)
        .bind(customer)
        .fetch_one(pool)
        .await?,
    );
    rows.insert(
        "content_projects",
        sqlx::query_scalar(
            "INSERT INTO content_projects (workspace_id, name, content_type) VALUES ($1, 'Post', 'blog_post') RETURNING id",
        )
        .bind(ws)
        .fetch_one(pool)
        .await?,
    );
    rows.insert(
        "analytics_events",
        sqlx::query_scalar(
            "INSERT INTO analytics_events (workspace_id, event_type, event_name) VALUES ($1, 'test', 'seeded') RETURNING id",
        )
        .bind(ws)
        .fetch_one(pool)
        .await?,
    );
    Ok(rows)
}

/// Column holding the tenant id of `table` (`id` for `workspaces`).
pub fn workspace_column(table: &str) -> &'static str {
    if table == "workspaces" {
        "id"
    } else {
        "workspace_id"
    }
}

/// An INSERT of one valid row into `table` for `workspace`. `product` must be a product of
/// that workspace (used by `product_variants`). Ids are UUIDs, so formatting them is safe.
pub fn insert_sql(table: &str, workspace: Uuid, product: Uuid) -> String {
    match table {
        "workspaces" => "INSERT INTO workspaces (name, slug) VALUES ('x', 'x-' || gen_random_uuid())".into(),
        "users" => format!(
            "INSERT INTO users (workspace_id, email, role) VALUES ('{workspace}', 'u-' || gen_random_uuid() || '@example.com', 'member')"
        ),
        "tasks" => format!(
            "INSERT INTO tasks (workspace_id, type, category, name, input) VALUES ('{workspace}', 't', 'content', 'n', '{{}}')"
        ),
        "stores" => format!(
            "INSERT INTO stores (workspace_id, name, platform, store_url, credentials)
             VALUES ('{workspace}', 's', 'etsy', 'https://' || gen_random_uuid() || '.example.com', '{{\"token\": \"t\"}}')"
        ),
        "products" => format!("INSERT INTO products (workspace_id, name) VALUES ('{workspace}', 'p')"),
        "product_variants" => {
            format!("INSERT INTO product_variants (workspace_id, product_id) VALUES ('{workspace}', '{product}')")
        }
        "customers" => format!(
            "INSERT INTO customers (workspace_id, email) VALUES ('{workspace}', 'c-' || gen_random_uuid() || '@example.com')"
        ),
        "orders" => format!(
            "INSERT INTO orders (workspace_id, external_id, total_amount, status, order_date, line_items)
             VALUES ('{workspace}', gen_random_uuid()::text, 10, 'pending', now(), '[]')"
        ),
        "content_projects" => format!(
            "INSERT INTO content_projects (workspace_id, name, content_type) VALUES ('{workspace}', 'c', 'blog_post')"
        ),
        "analytics_events" => format!(
            "INSERT INTO analytics_events (workspace_id, event_type, event_name) VALUES ('{workspace}', 'test', 'e')"
        ),
        other => panic!("no insert statement for table {other}"),
    }
}

/// Inserts one more row of `table` (not `workspaces`) into `workspace` as the superuser, with
/// [`insert_sql`]'s columns, and returns its id. Nothing references it, so a test may delete
/// it or move it without a foreign key getting in the way.
pub async fn fresh_row(pool: &PgPool, table: &str, workspace: Uuid, product: Uuid) -> Result<Uuid> {
    assert_ne!(
        table, "workspaces",
        "a workspace is not a row of a workspace"
    );
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('bizq.credentials_key', $1, true)")
        .bind(CREDENTIALS_KEY)
        .execute(&mut *tx)
        .await?;
    let sql = format!("{} RETURNING id", insert_sql(table, workspace, product));
    let id = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&mut *tx)
        .await
        .with_context(|| format!("insert a fresh {table} row"))?;
    tx.commit().await?;
    Ok(id)
}

/// An UPDATE moving row `id` of `table` (not `workspaces`) into workspace `to`, re-pointing
/// every composite foreign key it has to rows of `to` (`to_rows` as from [`seed_rows`]), so
/// that only row-level security can stop it. Meant for rows made by [`fresh_row`], which
/// reference nothing else and are referenced by nothing.
pub fn move_sql(table: &str, id: Uuid, to: Uuid, to_rows: &BTreeMap<&'static str, Uuid>) -> String {
    format!("{} WHERE id = '{id}'", move_all_sql(table, to, to_rows))
}

/// [`move_sql`] without a WHERE clause: moves every row of `table` the role may update. As
/// it reads no column of the table, PostgreSQL checks the new rows against the UPDATE
/// policies' WITH CHECK only (a WHERE reading the table adds the SELECT policy's USING too).
pub fn move_all_sql(table: &str, to: Uuid, to_rows: &BTreeMap<&'static str, Uuid>) -> String {
    match table {
        "product_variants" => format!(
            "UPDATE product_variants SET workspace_id = '{to}', product_id = '{}'",
            to_rows["products"]
        ),
        "workspaces" => panic!("a workspace cannot be moved into another"),
        _ => format!("UPDATE {table} SET workspace_id = '{to}'"),
    }
}

/// Asserts `result` is the row-level-security rejection of a new row (SQLSTATE 42501 and
/// "new row violates row-level security policy"), not a privilege or trigger error that
/// shares the SQLSTATE.
pub fn expect_rls_violation<T: std::fmt::Debug>(result: Result<T, sqlx::Error>, what: &str) {
    let message = expect_sqlstate(result, "42501", what);
    assert!(
        message.contains("new row violates row-level security policy"),
        "{what}: rejected, but not by a row-level security policy: {message}"
    );
}

/// Asserts `result` is a missing table privilege (SQLSTATE 42501, "permission denied").
pub fn expect_permission_denied<T: std::fmt::Debug>(result: Result<T, sqlx::Error>, what: &str) {
    let message = expect_sqlstate(result, "42501", what);
    assert!(
        message.contains("permission denied"),
        "{what}: rejected, but not for lack of a privilege: {message}"
    );
}

/// A harmless UPDATE of row `id` of `table` (touches no protected column).
pub fn touch_sql(table: &str, id: Uuid) -> String {
    match table {
        "workspaces" => format!("UPDATE workspaces SET name = name || '' WHERE id = '{id}'"),
        "analytics_events" => {
            format!("UPDATE analytics_events SET source = 'touched' WHERE id = '{id}'")
        }
        _ => format!("UPDATE {table} SET updated_at = now() WHERE id = '{id}'"),
    }
}

/// A new, dedicated connection (not returned to the pool, so role changes cannot leak).
pub async fn connect(pool: &PgPool) -> Result<PgConnection> {
    Ok(PgConnection::connect_with(&pool.connect_options()).await?)
}

/// Makes `conn` act as the Supabase `authenticated` role logged in as `auth_id`, with the
/// credentials key set (so store inserts fail only for RLS reasons).
pub async fn act_as(conn: &mut PgConnection, auth_id: Uuid) -> Result<()> {
    sqlx::query("RESET ROLE").execute(&mut *conn).await?;
    sqlx::query("SELECT set_config('request.jwt.claim.sub', $1, false), set_config('bizq.credentials_key', $2, false)")
        .bind(auth_id.to_string())
        .bind(CREDENTIALS_KEY)
        .execute(&mut *conn)
        .await?;
    sqlx::query("SET ROLE authenticated")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Makes `conn` act as `service_role` (BYPASSRLS), the way the backend services connect.
pub async fn act_as_service(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("RESET ROLE").execute(&mut *conn).await?;
    sqlx::query("SELECT set_config('request.jwt.claim.sub', '', false)")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SET ROLE service_role")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Runs a dynamic statement, returning rows affected.
pub async fn exec(conn: &mut PgConnection, sql: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await?
        .rows_affected())
}

/// Runs a dynamic `SELECT count(*) ...`.
pub async fn count(conn: &mut PgConnection, sql: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
        .fetch_one(conn)
        .await?)
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

/// Asserts `result` is a database error with SQLSTATE `code`; returns its message.
pub fn expect_sqlstate<T: std::fmt::Debug>(
    result: Result<T, sqlx::Error>,
    code: &str,
    what: &str,
) -> String {
    match result {
        Ok(v) => panic!("{what}: expected SQLSTATE {code}, but it succeeded ({v:?})"),
        Err(e) => {
            assert_eq!(
                sqlstate(&e).as_deref(),
                Some(code),
                "{what}: unexpected error {e}"
            );
            e.to_string()
        }
    }
}

/// Directory holding the sqlx migrations.
pub fn migrations_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations")
}

/// Asserts that a tenant's move of a `table` row into another workspace was refused: by the
/// RLS policy's WITH CHECK ([`expect_rls_violation`]), except for `tasks`, whose
/// `workspace_id` is not among the columns a tenant may write at all (migration 0009's
/// column grants), so the privilege check refuses it before any policy is evaluated.
pub fn expect_move_refused<T: std::fmt::Debug>(
    table: &str,
    result: Result<T, sqlx::Error>,
    what: &str,
) {
    if table == "tasks" {
        let message = expect_sqlstate(result, "42501", what);
        assert!(
            message.contains("permission denied for table tasks"),
            "{what}: expected the column privilege to refuse it: {message}"
        );
    } else {
        expect_rls_violation(result, what);
    }
}

/// Makes a fresh (not yet migrated) database look like a Supabase project: the roles
/// `anon`, `authenticated` and `service_role` (cluster-wide; created when missing), and the
/// default privileges Supabase sets for the migrating role in schema `public`: ALL on every
/// table, sequence and function it creates, for all three roles. Run it before migrating.
pub async fn supabase_default_privileges(pool: &PgPool) -> Result<()> {
    for (role, options) in [
        ("anon", "NOLOGIN NOINHERIT"),
        ("authenticated", "NOLOGIN NOINHERIT"),
        ("service_role", "NOLOGIN NOINHERIT BYPASSRLS"),
    ] {
        // Another test database may create the same role at the same moment.
        let _ = sqlx::raw_sql(AssertSqlSafe(format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                 CREATE ROLE {role} {options}; END IF;
               EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        )))
        .execute(pool)
        .await;
    }
    let me: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(pool)
        .await?;
    for kind in ["TABLES", "SEQUENCES", "FUNCTIONS"] {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER DEFAULT PRIVILEGES FOR ROLE \"{me}\" IN SCHEMA public
               GRANT ALL ON {kind} TO anon, authenticated, service_role"
        )))
        .execute(pool)
        .await
        .with_context(|| format!("default privileges on {kind}"))?;
    }
    Ok(())
}
