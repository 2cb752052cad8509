//! The scheduler runtime: admits new tasks (estimating AI costs), promotes due ones, unparks
//! tasks whose workspace can pay again or whose provider's park expired, reclaims tasks of
//! dead workers, and runs housekeeping. Any number of schedulers can run at once: every step
//! takes its rows with `SKIP LOCKED`, and housekeeping runs under an advisory lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::handlers::Handlers;
use crate::lifecycle::{self, AdmitReport, CHANNEL_PENDING, ReclaimReport};
use crate::providers::Providers;
use crate::{Result, housekeeping};

/// Totals over a scheduler's life, printed at exit.
#[derive(Debug, Default, Clone)]
pub struct SchedulerStats {
    pub admitted: AdmitReport,
    pub promoted: u64,
    pub unparked: u64,
    pub reclaimed: ReclaimReport,
    pub passes: u64,
}

pub struct Scheduler {
    pool: PgPool,
    config: Config,
    /// Routing and prices (no API keys): admission estimates `ai.generate` costs with them.
    providers: Option<Providers>,
}

impl Scheduler {
    pub fn new(pool: PgPool, config: Config) -> Self {
        let providers = match Providers::for_routing(&config) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "providers config unusable: admission will not estimate costs");
                None
            }
        };
        Self {
            pool,
            config,
            providers,
        }
    }

    /// One full pass: admit and promote until nothing is left, then unpark and reclaim.
    pub async fn pass(&self, stats: &mut SchedulerStats) -> Result<()> {
        let started = Instant::now();
        let (admitted_before, reclaimed_before) = (stats.admitted.clone(), stats.reclaimed.clone());
        let sc = &self.config.scheduler;
        let known_types = Handlers::shared().types();
        loop {
            let r = lifecycle::admit_with_estimates(
                &self.pool,
                sc.batch,
                &known_types,
                sc.dependency_failure,
                self.providers.as_ref(),
            )
            .await?;
            let handled = r.handled();
            let a = &mut stats.admitted;
            a.queued += r.queued;
            a.waiting += r.waiting;
            a.rejected += r.rejected;
            a.escalated += r.escalated;
            a.cancelled += r.cancelled;
            a.deferred += r.deferred;
            if handled + r.deferred < sc.batch as u64 {
                break;
            }
        }
        stats.unparked += lifecycle::unpark_providers(&self.pool).await?;
        loop {
            let n = lifecycle::promote(&self.pool, sc.batch).await?;
            stats.promoted += n;
            if n < sc.batch as u64 {
                break;
            }
        }
        stats.unparked += lifecycle::unpark(&self.pool).await?;
        let limits: Vec<(String, i32)> = self
            .config
            .worker
            .max_attempts
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        loop {
            let r = lifecycle::reclaim_expired(
                &self.pool,
                sc.batch,
                &limits,
                self.config.worker.default_max_attempts,
            )
            .await?;
            stats.reclaimed.requeued += r.requeued;
            stats.reclaimed.failed += r.failed;
            if r.requeued + r.failed > 0 {
                tracing::info!(
                    requeued = r.requeued,
                    failed = r.failed,
                    "reclaimed tasks with expired leases"
                );
            }
            if r.requeued + r.failed < sc.batch as u64 {
                break;
            }
        }
        stats.passes += 1;
        crate::metrics::scheduler_pass_since(
            &admitted_before,
            &reclaimed_before,
            stats,
            started.elapsed(),
        );
        Ok(())
    }

    /// Runs passes until `shutdown`: right after a `bizq_pending` notification, else every
    /// `tick_ms`. Database errors are logged and retried with backoff; a PostgreSQL restart
    /// costs a few failed passes, nothing more.
    pub async fn run(self, shutdown: CancellationToken) -> Result<SchedulerStats> {
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let listener = tokio::spawn(listen(self.pool.clone(), wake.clone(), stop.clone()));
        let mut stats = SchedulerStats::default();
        let tick = Duration::from_millis(self.config.scheduler.tick_ms);
        let hk_every = Duration::from_secs(self.config.scheduler.housekeeping_interval_seconds);
        let mut next_housekeeping = Instant::now();
        let mut failures = 0u32;
        tracing::info!("scheduler started");
        while !shutdown.is_cancelled() {
            match self.pass(&mut stats).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    let pause = crate::retry::pause_after_db_errors(failures);
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "scheduler pass failed");
                    tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = shutdown.cancelled() => break }
                    continue;
                }
            }
            if Instant::now() >= next_housekeeping {
                match housekeeping::run(&self.pool, &self.config.scheduler).await {
                    Ok(Some(r)) => tracing::info!(?r, "housekeeping done"),
                    Ok(None) => tracing::debug!("housekeeping running elsewhere"),
                    Err(e) => tracing::warn!(error = %e, "housekeeping failed"),
                }
                crate::registry::housekeep(&self.pool, &self.config.ops).await;
                next_housekeeping = Instant::now() + hk_every;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        stop.cancel();
        let _ = listener.await;
        tracing::info!(?stats, "scheduler stopped");
        Ok(stats)
    }
}

async fn listen(pool: PgPool, wake: Arc<Notify>, stop: CancellationToken) {
    let wake_on_work = wake.clone();
    crate::listen::listen(pool, &[CHANNEL_PENDING], wake, stop, move |_| {
        wake_on_work.notify_one()
    })
    .await
}
