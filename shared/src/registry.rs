//! Live workers: each bizq-worker and bizq-scheduler registers a row in `workers` at start-up,
//! heartbeats it (in-flight count, last claim, draining), and deletes it on a clean shutdown;
//! rows not seen for a while are "lost" and housekeeping forgets them.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::config::OpsConfig;

/// What a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Worker,
    Scheduler,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Scheduler => "scheduler",
        }
    }
}

/// The row a process registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: String,
    pub role: Role,
    pub host: String,
    pub pid: i32,
    pub version: String,
    /// Task type patterns served (workers); empty for a scheduler.
    pub types: Vec<String>,
    pub concurrency: i32,
    /// Where this process serves `/metrics` (the bound address, port 0 resolved).
    pub metrics_addr: Option<String>,
}

impl Registration {
    /// This process, with the host name from `/etc/hostname` or `$HOSTNAME`.
    pub fn this_process(id: &str, role: Role, types: &[String], concurrency: usize) -> Self {
        Self {
            id: id.to_string(),
            role,
            host: host_name(),
            pid: std::process::id() as i32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            types: types.to_vec(),
            concurrency: concurrency.min(i32::MAX as usize) as i32,
            metrics_addr: None,
        }
    }
}

/// The machine's name, as the worker id also uses it.
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// What the heartbeat reports: kept current by the runtime it describes.
#[derive(Default)]
pub struct Liveness {
    in_flight: OnceLock<Box<dyn Fn() -> usize + Send + Sync>>,
    /// Unix milliseconds of the last claim that got at least one task; 0 = none yet.
    last_claim_ms: AtomicI64,
    draining: AtomicBool,
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Liveness")
            .field("in_flight", &self.in_flight())
            .field("last_claim_ms", &self.last_claim_ms.load(Ordering::Relaxed))
            .field("draining", &self.is_draining())
            .finish()
    }
}

impl Liveness {
    /// Tells the heartbeat how to count the tasks running now (set once, by the runtime).
    pub fn count_in_flight_with(&self, count: impl Fn() -> usize + Send + Sync + 'static) {
        let _ = self.in_flight.set(Box::new(count));
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.get().map_or(0, |f| f())
    }

    /// Records a claim that got `n` tasks.
    pub fn claimed(&self, n: usize) {
        if n > 0 {
            self.last_claim_ms
                .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        }
    }

    pub fn last_claim(&self) -> Option<DateTime<Utc>> {
        match self.last_claim_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Inserts (or, for a process restarted under the same `--id`, replaces) this process's row.
pub async fn register(pool: &PgPool, r: &Registration) -> Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, role, host, pid, version, types, concurrency, metrics_addr,
                              in_flight, state, started_at, last_seen_at, last_claim_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, 'running', now(), now(), NULL)
         ON CONFLICT (id) DO UPDATE
            SET role = EXCLUDED.role,
                host = EXCLUDED.host,
                pid = EXCLUDED.pid,
                version = EXCLUDED.version,
                types = EXCLUDED.types,
                concurrency = EXCLUDED.concurrency,
                metrics_addr = EXCLUDED.metrics_addr,
                in_flight = 0,
                state = 'running',
                started_at = now(),
                last_seen_at = now(),
                last_claim_at = NULL",
    )
    .bind(&r.id)
    .bind(r.role.as_str())
    .bind(&r.host)
    .bind(r.pid)
    .bind(&r.version)
    .bind(&r.types)
    .bind(r.concurrency)
    .bind(&r.metrics_addr)
    .execute(pool)
    .await?;
    Ok(())
}

/// Refreshes the row; re-registers when it is gone (forgotten after a long database outage).
pub async fn beat(pool: &PgPool, r: &Registration, live: &Liveness) -> Result<()> {
    let updated = sqlx::query(
        "UPDATE workers
            SET last_seen_at = now(),
                in_flight = $2,
                last_claim_at = $3,
                state = CASE WHEN $4 THEN 'draining' ELSE 'running' END
          WHERE id = $1",
    )
    .bind(&r.id)
    .bind(live.in_flight().min(i32::MAX as usize) as i32)
    .bind(live.last_claim())
    .bind(live.is_draining())
    .execute(pool)
    .await?
    .rows_affected();
    if updated == 0 {
        register(pool, r).await?;
    }
    Ok(())
}

/// Deletes the row: the process is stopping cleanly.
pub async fn deregister(pool: &PgPool, id: &str) -> Result<()> {
    sqlx::query("DELETE FROM workers WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Housekeeping: deletes rows not seen for `ops.worker_forget_after_seconds`.
pub async fn forget_lost(pool: &PgPool, ops: &OpsConfig) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM workers
          WHERE last_seen_at < now() - $1::bigint * interval '1 second'",
    )
    .bind(ops.worker_forget_after_seconds.min(i64::MAX as u64) as i64)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// [`forget_lost`] as the scheduler's housekeeping runs it: errors are logged, not fatal.
pub async fn housekeep(pool: &PgPool, ops: &OpsConfig) {
    match forget_lost(pool, ops).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            forgotten = n,
            "deleted workers rows not seen for a long time"
        ),
        Err(e) => tracing::warn!(error = %e, "could not delete lost workers rows"),
    }
}

/// One row of `bizq workers` (and the dashboard).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerRow {
    pub id: String,
    pub role: String,
    pub host: String,
    pub pid: i32,
    pub version: String,
    pub types: Vec<String>,
    pub concurrency: i32,
    pub in_flight: i32,
    /// `running`, `draining`, or `lost` (not seen for the lost-after window).
    pub state: String,
    pub metrics_addr: Option<String>,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub last_claim_at: Option<DateTime<Utc>>,
    /// Seconds since `last_seen_at`, by the database's clock.
    pub seen_ago_s: f64,
}

/// Every registered process, schedulers first, then by id; `state` is `lost` for rows not
/// seen for `ops.worker_lost_after_seconds`.
pub async fn list(pool: &PgPool, ops: &OpsConfig) -> Result<Vec<WorkerRow>> {
    let rows: Vec<WorkerRow> = sqlx::query_as(
        "SELECT id, role, host, pid, version, types, concurrency, in_flight,
                CASE WHEN last_seen_at < now() - $1::bigint * interval '1 second' THEN 'lost'
                     ELSE state END AS state,
                metrics_addr, started_at, last_seen_at, last_claim_at,
                EXTRACT(EPOCH FROM now() - last_seen_at)::float8 AS seen_ago_s
           FROM workers
          ORDER BY role DESC, id",
    )
    .bind(ops.worker_lost_after_seconds.min(i64::MAX as u64) as i64)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// A registered process: its heartbeat runs until [`Presence::leave`].
pub struct Presence {
    pool: PgPool,
    registration: Registration,
    stop: CancellationToken,
    beat: JoinHandle<()>,
}

impl Presence {
    /// Registers and starts heartbeating every `ops.heartbeat_ms`. When `shutdown` fires the
    /// row turns `draining` at the next beat (the process is finishing its tasks).
    pub async fn join(
        pool: &PgPool,
        registration: Registration,
        live: Arc<Liveness>,
        ops: &OpsConfig,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        register(pool, &registration).await?;
        tracing::info!(id = %registration.id, role = registration.role.as_str(),
                       "registered in workers");
        let stop = CancellationToken::new();
        let every = Duration::from_millis(ops.heartbeat_ms);
        let beat = tokio::spawn({
            let pool = pool.clone();
            let registration = registration.clone();
            let stop = stop.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = shutdown.cancelled(), if !live.is_draining() => live.set_draining(),
                        _ = stop.cancelled() => return,
                    }
                    if let Err(e) = beat(&pool, &registration, &live).await {
                        tracing::warn!(error = %e, "workers heartbeat failed; will retry");
                    }
                }
            }
        });
        Ok(Self {
            pool: pool.clone(),
            registration,
            stop,
            beat,
        })
    }

    /// Stops the heartbeat and deletes the row (clean shutdown).
    pub async fn leave(self) {
        self.stop.cancel();
        let _ = self.beat.await;
        match deregister(&self.pool, &self.registration.id).await {
            Ok(()) => tracing::info!(id = %self.registration.id, "removed from workers"),
            Err(e) => tracing::warn!(error = %e,
                "could not remove this process from workers; it will show as lost"),
        }
    }
}
