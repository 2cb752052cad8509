//! Connecting to PostgreSQL, and the schema migrations embedded in every binary.

use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

use crate::Result;
use crate::config::DependencyFailurePolicy;

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Applies every pending migration, then enforces the tenant privilege allow-list
/// ([`enforce_privileges`]) whether or not a migration ran. Safe to run from several
/// processes at once (sqlx takes an advisory lock). Returns what the enforcement revoked.
pub async fn migrate(pool: &PgPool) -> Result<Vec<Revoked>> {
    MIGRATOR.run(pool).await?;
    enforce_privileges(pool).await
}

/// One privilege [`enforce_privileges`] took from a tenant role (or from PUBLIC).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Revoked {
    /// `anon`, `authenticated` or `PUBLIC`.
    pub role_name: String,
    /// `table` (also views), `sequence`, `function`, `type` or `schema`.
    pub object_type: String,
    pub object_name: String,
    /// Set for a column privilege.
    pub column_name: Option<String>,
    pub privilege: String,
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {} {}",
            self.privilege, self.object_type, self.object_name
        )?;
        if let Some(c) = &self.column_name {
            write!(f, " ({c})")?;
        }
        write!(f, " from {}", self.role_name)
    }
}

/// Revokes from `anon`, `authenticated` and PUBLIC every privilege in schema `public` beyond
/// the allow-list `bizq_tenant_grants` (migration 0017), so an object created after the
/// migrations (Supabase's default privileges give those roles ALL on it) is closed again.
/// Fails when something is left that this role cannot revoke, or when a trigger would run
/// someone else's function as the engine. Each revocation is logged (info): on a
/// database that was already enforced, there is none.
pub async fn enforce_privileges(pool: &PgPool) -> Result<Vec<Revoked>> {
    let revoked: Vec<Revoked> = sqlx::query_as(
        "SELECT role_name, object_type, object_name, column_name, privilege
           FROM bizq_enforce_privileges()",
    )
    .fetch_all(pool)
    .await?;
    for r in &revoked {
        tracing::info!(revoked = %r, "privilege beyond the tenant allow-list revoked");
    }
    Ok(revoked)
}

/// Fails with a clear message when the database lacks migrations this binary knows, so a
/// worker never runs against an old schema.
pub async fn check_schema(pool: &PgPool) -> Result<()> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .unwrap_or(None);
    match applied {
        Some(v) if v >= latest => Ok(()),
        _ => Err(crate::Error::Config(format!(
            "the database schema is not current (applied: {}, this binary needs: {latest}); run `bizq migrate`",
            applied.map_or("none".to_string(), |v| v.to_string())
        ))),
    }
}

/// Options for an engine pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Shown in `pg_stat_activity.application_name`.
    pub application_name: String,
    pub max_connections: u32,
    /// What the dependency trigger does to dependents of a failed task (see migration 0006).
    pub dependency_failure: DependencyFailurePolicy,
}

/// Opens a pool. Connections are re-established on their own after a server restart: a
/// failed acquire is an error the caller's loop retries.
pub async fn connect(url: &str, settings: &PoolSettings) -> Result<PgPool> {
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .application_name(&settings.application_name);
    // One plain connection first, so a wrong URL or a server that is down is reported with
    // the real cause (refused, unknown database, bad password), not as a pool timeout.
    // The message names host, port and database, never the password.
    let target = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default)")
    );
    let probe = tokio::time::timeout(
        Duration::from_secs(10),
        <PgConnection as sqlx::Connection>::connect_with(&options),
    );
    match probe.await {
        Ok(Ok(conn)) => {
            let _ = sqlx::Connection::close(conn).await;
        }
        Ok(Err(e)) => {
            return Err(crate::Error::Connect(format!(
                "cannot connect to PostgreSQL at {target}: {e}"
            )));
        }
        Err(_) => {
            return Err(crate::Error::Connect(format!(
                "cannot connect to PostgreSQL at {target}: no answer within 10 s"
            )));
        }
    }
    let policy = settings.dependency_failure.as_str();
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                let sql = match policy {
                    "escalate" => "SET bizq.dependency_failure_policy = 'escalate'",
                    _ => "SET bizq.dependency_failure_policy = 'cancel'",
                };
                conn.execute(sql).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await?;
    Ok(pool)
}
