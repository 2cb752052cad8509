//! Connecting to PostgreSQL, and the schema migrations embedded in every binary.

use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

use crate::Result;
use crate::config::DependencyFailurePolicy;

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Applies every pending migration. Safe to run from several processes at once (sqlx takes
/// an advisory lock) and a no-op when the schema is current.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
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
