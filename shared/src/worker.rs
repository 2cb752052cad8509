//! The worker runtime: claims tasks into free slots, runs their handlers outside any
//! transaction, keeps their leases alive, aborts cancelled ones, writes results in batches,
//! and shuts down without losing a task.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Result;
use crate::config::Config;
use crate::handlers::{HandlerContext, Handlers, PROVIDER_PARKED, TaskContext, TaskError};
use crate::lifecycle::{
    self, CHANNEL_CANCEL, CHANNEL_QUEUED, ClaimRequest, ClaimedTask, Completion, Failure,
    FailureAction,
};
use crate::providers::{Preferences, Providers, TaskErrorKind};
use crate::retry::{self, jittered, pause_after_db_errors};
use crate::task::ErrorDetails;
use crate::task_types;

/// Counts of what one worker process did, printed at exit.
#[derive(Debug, Default, Clone)]
pub struct WorkerStats {
    pub claimed: u64,
    pub completed: u64,
    pub retried: u64,
    /// Rate limited: back to the queue until the provider's reset, no attempt used.
    pub snoozed: u64,
    /// Their provider was parked (auth or quota): waiting, no attempt used.
    pub parked: u64,
    pub failed: u64,
    /// Results dropped because the lease was gone (cancelled or reclaimed meanwhile).
    pub fenced: u64,
    pub aborted: u64,
    pub released: u64,
}

/// A task this process is running.
struct Running {
    lease_token: Uuid,
    workspace_id: Uuid,
    abort: CancellationToken,
}

type RunningMap = Arc<Mutex<HashMap<Uuid, Running>>>;

/// What happened to one attempt.
enum Attempt {
    Completed(Completion),
    Failed(Failure),
    /// Stopped without a result (cancelled, lease lost, or shutting down).
    Aborted(Uuid),
}

/// An attempt's result with the slot it occupies; the slot frees once the result is written.
struct Outcome {
    attempt: Attempt,
    _slot: OwnedSemaphorePermit,
}

/// A name unique across the fleet, shown in `tasks.locked_by`.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    let short = Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &short[..8])
}

/// Connections one worker process uses at most: one per result writer, plus the claim loop,
/// the listener, the heartbeat and one spare for shutdown's release.
pub fn connections_needed(config: &crate::config::WorkerConfig) -> u32 {
    (config.result_writers + 4) as u32
}

/// One worker process.
pub struct Worker {
    pool: PgPool,
    config: Arc<Config>,
    providers: Providers,
    /// Task type → handler.
    handlers: Arc<Handlers>,
    worker_id: String,
    type_patterns: Option<Vec<String>>,
    live: Arc<crate::registry::Liveness>,
}

impl Worker {
    /// Builds the worker and its providers; API keys are read from the environment here, so
    /// a missing key stops the worker at start-up with a configuration error.
    pub fn new(pool: PgPool, config: Config, worker_id: String) -> Result<Self> {
        let providers = Providers::from_config(&config)?
            .with_budgets(crate::providers::limiter::Budgets::new(pool.clone()));
        let type_patterns = config.worker.type_like_patterns();
        Ok(Self {
            pool,
            config: Arc::new(config),
            providers,
            handlers: Arc::new(Handlers::builtin()),
            worker_id,
            type_patterns,
            live: Arc::default(),
        })
    }

    /// Runs these handlers instead of the built-in ones (a product's own task types).
    pub fn with_handlers(mut self, handlers: Handlers) -> Self {
        self.handlers = Arc::new(handlers);
        self
    }

    pub fn id(&self) -> &str {
        &self.worker_id
    }

    /// What this worker reports to the `workers` table and `/metrics` while it runs.
    pub fn liveness(&self) -> Arc<crate::registry::Liveness> {
        self.live.clone()
    }

    /// Runs until `shutdown` fires, then drains: no new claims, running tasks get the grace
    /// period, the rest are released to `queued` without counting an attempt.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerStats> {
        let wc = &self.config.worker;
        self.providers.configure_budgets().await?;
        // Registered types let an INSERT queue its own task; without them (database not
        // reachable yet) tasks go through admission, as before, so this is not fatal.
        match task_types::register_types(
            &self.pool,
            &self.handlers.types(),
            self.type_patterns.as_deref(),
            &self.worker_id,
            !self.config.models.is_empty(),
        )
        .await
        {
            Ok(types) => tracing::info!(?types, "registered task types"),
            Err(e @ crate::Error::UntrustedTriggers { .. }) => {
                tracing::error!(error = %e, "task types not registered")
            }
            Err(e) => tracing::warn!(error = %e, "could not register task types"),
        }
        let slots = Arc::new(Semaphore::new(wc.concurrency));
        let running: RunningMap = Arc::default();
        let wake = Arc::new(Notify::new());
        let stats = Arc::new(Mutex::new(WorkerStats::default()));
        let (results_tx, results_rx) = mpsc::unbounded_channel::<Outcome>();
        let background = CancellationToken::new();
        self.live.count_in_flight_with({
            let running = running.clone();
            move || running_count(&running)
        });

        let listener = tokio::spawn(listen(
            self.pool.clone(),
            running.clone(),
            wake.clone(),
            background.clone(),
        ));
        let heart = tokio::spawn(heartbeat_loop(
            self.pool.clone(),
            running.clone(),
            wc.lease(),
            Duration::from_millis(wc.heartbeat_ms),
            background.clone(),
        ));
        // Several writers share one queue of results: each takes what is waiting (up to a
        // batch) and writes it while the next writer gathers the following batch.
        let results_rx = Arc::new(tokio::sync::Mutex::new(results_rx));
        let writers: Vec<_> = (0..wc.result_writers)
            .map(|_| {
                tokio::spawn(write_results(
                    self.pool.clone(),
                    results_rx.clone(),
                    running.clone(),
                    stats.clone(),
                    wc.complete_batch,
                    wc.lease(),
                ))
            })
            .collect();

        tracing::info!(worker = %self.worker_id, concurrency = wc.concurrency,
                       types = ?wc.types, "worker started");
        // One claim loop: several were measured and lost, because concurrent claims queue
        // on the same workspace rows (their credit reservations); see the README.
        self.claim_loop(&slots, &running, &wake, &stats, &results_tx, &shutdown)
            .await;

        // Drain: let running tasks finish within the grace period, then release the rest.
        tracing::info!(worker = %self.worker_id, "shutting down: no new claims");
        let grace = Duration::from_secs(wc.shutdown_grace_seconds);
        let deadline = Instant::now() + grace;
        while running_count(&running) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let leftovers: Vec<(Uuid, Uuid)> = match running.lock() {
            Ok(map) => map
                .iter()
                .map(|(id, r)| {
                    r.abort.cancel();
                    (*id, r.lease_token)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        if !leftovers.is_empty() {
            match lifecycle::release(&self.pool, &leftovers).await {
                Ok(n) => {
                    let ids: Vec<Uuid> = leftovers.iter().map(|(id, _)| *id).collect();
                    crate::metrics::released(&ids, n);
                    tracing::info!(released = n, tasks = ?ids, "released unfinished tasks to the queue");
                    if let Ok(mut s) = stats.lock() {
                        s.released += n;
                    }
                }
                Err(e) => tracing::error!(error = %e,
                    "could not release unfinished tasks; the scheduler will reclaim them when their leases expire"),
            }
        }
        drop(results_tx);
        for writer in writers {
            let _ = writer.await;
        }
        background.cancel();
        let _ = heart.await;
        let _ = listener.await;
        let stats = stats.lock().map(|s| s.clone()).unwrap_or_default();
        tracing::info!(worker = %self.worker_id, ?stats, "worker stopped");
        Ok(stats)
    }

    /// The claim loop: waits for free slots, claims up to that many tasks (at most a batch),
    /// starts them, and sleeps until notified or a jittered poll when the queue runs dry.
    async fn claim_loop(
        &self,
        slots: &Arc<Semaphore>,
        running: &RunningMap,
        wake: &Notify,
        stats: &Mutex<WorkerStats>,
        results_tx: &mpsc::UnboundedSender<Outcome>,
        shutdown: &CancellationToken,
    ) {
        let wc = &self.config.worker;
        let mut failures_in_a_row = 0u32;
        let mut parked_checked: Option<Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            // Which providers the fleet parked: read at most once a second, and only when a
            // real provider is configured (routing under `auto` skips parked ones).
            if self.providers.has_real_providers()
                && parked_checked.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                parked_checked = Some(Instant::now());
                match lifecycle::parked_providers(&self.pool).await {
                    Ok(p) => self.providers.set_parked(p),
                    Err(e) => tracing::warn!(error = %e, "cannot read parked providers"),
                }
            }
            // Wait for at least one free slot, then take every free one (up to a batch).
            let mut permits = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.cancelled() => break,
            };
            let extra = slots
                .available_permits()
                .min(wc.claim_batch.saturating_sub(1));
            if extra > 0
                && let Ok(more) = slots.clone().try_acquire_many_owned(extra as u32)
            {
                permits.merge(more);
            }
            let wanted = permits.num_permits();
            let request = ClaimRequest {
                worker_id: &self.worker_id,
                limit: wanted as i64,
                type_patterns: self.type_patterns.as_deref(),
                lease: wc.lease(),
            };
            let claim_started = Instant::now();
            let claimed = match lifecycle::claim(&self.pool, &request).await {
                Ok(c) => {
                    failures_in_a_row = 0;
                    self.live.claimed(c.len());
                    crate::metrics::claimed(&self.pool, &c, claim_started.elapsed());
                    c
                }
                Err(e) => {
                    drop(permits);
                    failures_in_a_row += 1;
                    let pause = pause_after_db_errors(failures_in_a_row);
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "claim failed; retrying");
                    tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = shutdown.cancelled() => break }
                    continue;
                }
            };
            let got = claimed.len();
            if let Ok(mut s) = stats.lock() {
                s.claimed += got as u64;
            }
            for task in claimed {
                let Some(permit) = permits.split(1) else {
                    break;
                };
                self.start(task, permit, running, results_tx);
            }
            drop(permits);
            if got < wanted {
                // The queue is drained for now: sleep until notified, or a jittered poll.
                let poll = jittered(Duration::from_millis(wc.poll_interval_ms));
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }

    /// Spawns one attempt.
    fn start(
        &self,
        task: ClaimedTask,
        permit: OwnedSemaphorePermit,
        running: &RunningMap,
        results: &mpsc::UnboundedSender<Outcome>,
    ) {
        let abort = CancellationToken::new();
        if let Ok(mut map) = running.lock() {
            map.insert(
                task.id,
                Running {
                    lease_token: task.lease_token,
                    workspace_id: task.workspace_id,
                    abort: abort.clone(),
                },
            );
        }
        let providers = self.providers.clone();
        let handlers = self.handlers.clone();
        let cx = HandlerContext {
            providers: providers.clone(),
            pool: self.pool.clone(),
        };
        let config = self.config.clone();
        let results = results.clone();
        let span = tracing::info_span!("task", task = %task.id, workspace = %task.workspace_id);
        let run_task = async move {
            let started = Instant::now();
            let ctx = TaskContext {
                id: task.id,
                workspace_id: task.workspace_id,
                attempt: task.attempt,
                task_type: task.task_type.clone(),
                input: task.input.clone(),
                ai_provider: task.ai_provider.clone(),
                ai_model: task.ai_model.clone(),
                preferences: Preferences::from_json(task.ai_preferences.as_ref()),
            };
            let timeout = Duration::from_secs(config.worker.task_timeout_seconds);
            let run = AssertUnwindSafe(tokio::time::timeout(timeout, handlers.run(&ctx, &cx)))
                .catch_unwind();
            let result = tokio::select! {
                r = run => Some(r),
                _ = abort.cancelled() => None,
            };
            let elapsed_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
            let max_attempts = task
                .max_attempts
                .unwrap_or_else(|| config.worker.max_attempts_for(&task.task_type));
            // Flatten catch_unwind(timeout(run)) into the handler's own Result.
            let result = result.map(|r| match r {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_elapsed)) => Err(TaskError::retryable(
                    "timeout",
                    format!("the handler did not finish within {} s", timeout.as_secs()),
                )),
                Err(_panic) => Err(TaskError::permanent(
                    "handler_panicked",
                    "the handler panicked; see the worker's log",
                )),
            });
            let attempt = match result {
                None => Attempt::Aborted(task.id),
                Some(Ok(out)) => Attempt::Completed(Completion {
                    id: task.id,
                    lease_token: task.lease_token,
                    output: out.output,
                    actual_cost: out.cost,
                    cost_breakdown: out.cost_breakdown,
                    processing_time_ms: elapsed_ms,
                    ai_provider: out.provider,
                    ai_model: out.model,
                }),
                Some(Err(error)) => Attempt::Failed(failure(
                    &config,
                    &providers,
                    &task,
                    max_attempts,
                    error,
                    elapsed_ms,
                )),
            };
            let _ = results.send(Outcome {
                attempt,
                _slot: permit,
            });
        };
        // Every log line of the run carries the task and its workspace.
        tokio::spawn(tracing::Instrument::instrument(run_task, span));
    }
}

/// Turns a failed attempt into what the engine does with the task, and the `error_details`
/// it records.
fn failure(
    config: &Config,
    providers: &Providers,
    task: &ClaimedTask,
    max_attempts: i32,
    error: TaskError,
    elapsed_ms: i32,
) -> Failure {
    let mut details = ErrorDetails {
        max_attempts: Some(max_attempts),
        retryable: Some(error.is_retryable()),
        http_status: error.http_status,
        body_excerpt: error.body_excerpt.as_deref().map(String::from),
        request_id: error.request_id.as_deref().map(String::from),
        ..ErrorDetails::new(error.code, error.message.clone(), task.attempt)
    };
    let max_wait = Duration::from_millis(config.retry.max_ms);
    let action = match &error.kind {
        TaskErrorKind::Retryable { retry_after } if task.attempt < max_attempts => {
            let d = retry::delay(&config.retry, task.attempt, *retry_after);
            details.retry_in_ms = Some(d.as_millis() as u64);
            FailureAction::Retry(d)
        }
        TaskErrorKind::Retryable { .. } => {
            details.message = format!(
                "{} (gave up after {} attempts)",
                error.message, task.attempt
            );
            FailureAction::Fail
        }
        TaskErrorKind::Permanent => FailureAction::Fail,
        TaskErrorKind::Snooze { until, reason } => {
            // A reset far away (or a clock skew) is capped like any retry delay.
            let d = (*until - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(max_wait);
            details.code = "rate_limited".into();
            details.reason = Some(reason.to_string());
            details.until =
                Some(chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default());
            details.retry_in_ms = Some(d.as_millis() as u64);
            FailureAction::Snooze(d)
        }
        TaskErrorKind::ProviderUnavailable { provider } if error.code == PROVIDER_PARKED => {
            // Known to be parked: wait for the recorded park, do not extend it.
            details.provider = Some(provider.clone());
            FailureAction::Park {
                provider: provider.clone(),
                park: None,
            }
        }
        TaskErrorKind::ProviderUnavailable { provider } => {
            let park_for = Duration::from_secs(config.providers.park_seconds);
            let until =
                chrono::Utc::now() + chrono::Duration::from_std(park_for).unwrap_or_default();
            providers.park(provider, until);
            details.provider = Some(provider.clone());
            details.parked_until = Some(until);
            tracing::warn!(provider = %provider, code = %error.code, park_seconds = park_for.as_secs(),
                           "provider parked fleet-wide: {}", error.message);
            FailureAction::Park {
                provider: provider.clone(),
                park: Some((park_for, format!("{}: {}", error.code, error.message))),
            }
        }
    };
    Failure {
        id: task.id,
        lease_token: task.lease_token,
        action,
        error_details: details,
        processing_time_ms: elapsed_ms,
    }
}

fn running_count(running: &RunningMap) -> usize {
    running.lock().map(|m| m.len()).unwrap_or(0)
}

/// One result writer: whatever is waiting when it comes round goes in one transaction (at
/// most `batch`). Writers take turns at the shared queue, so their batches never overlap. A
/// database error keeps the results and retries them until their leases would have expired
/// anyway; then they are dropped (the scheduler reclaims).
async fn write_results(
    pool: PgPool,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Outcome>>>,
    running: RunningMap,
    stats: Arc<Mutex<WorkerStats>>,
    batch: usize,
    lease: Duration,
) {
    let mut buffer: Vec<Outcome> = Vec::with_capacity(batch);
    loop {
        {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            buffer.push(first);
            while buffer.len() < batch {
                match rx.try_recv() {
                    Ok(o) => buffer.push(o),
                    Err(_) => break,
                }
            }
        }
        let mut completions = Vec::new();
        let mut failures = Vec::new();
        let mut aborted = 0u64;
        let mut aborted_ids = Vec::new();
        let mut done_ids = Vec::with_capacity(buffer.len());
        for o in &buffer {
            match &o.attempt {
                Attempt::Completed(c) => {
                    done_ids.push(c.id);
                    completions.push(c.clone());
                }
                Attempt::Failed(f) => {
                    done_ids.push(f.id);
                    failures.push(f.clone());
                }
                Attempt::Aborted(id) => {
                    done_ids.push(*id);
                    aborted_ids.push(*id);
                    aborted += 1;
                }
            }
        }
        let batch_started = Instant::now();
        let give_up = Instant::now() + lease;
        let mut attempt = 0u32;
        let written = loop {
            match lifecycle::finish_batch(&pool, &completions, &failures).await {
                Ok(w) => break Some(w),
                Err(e) if Instant::now() < give_up => {
                    attempt += 1;
                    let pause = pause_after_db_errors(attempt);
                    tracing::warn!(error = %e, results = completions.len() + failures.len(),
                                   "writing results failed; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "giving up on writing results; their leases expired");
                    break None;
                }
            }
        };
        let written: std::collections::HashSet<Uuid> =
            written.unwrap_or_default().into_iter().collect();
        crate::metrics::results(
            &pool,
            &completions,
            &failures,
            &aborted_ids,
            &written,
            batch_started.elapsed(),
        )
        .await;
        if let Ok(mut s) = stats.lock() {
            s.aborted += aborted;
            for c in &completions {
                if written.contains(&c.id) {
                    s.completed += 1;
                } else {
                    s.fenced += 1;
                }
            }
            for f in &failures {
                if !written.contains(&f.id) {
                    s.fenced += 1;
                } else {
                    match f.action {
                        FailureAction::Retry(_) => s.retried += 1,
                        FailureAction::Snooze(_) => s.snoozed += 1,
                        FailureAction::Park { .. } => s.parked += 1,
                        FailureAction::Fail => s.failed += 1,
                    }
                }
            }
        }
        if let Ok(mut map) = running.lock() {
            for c in completions.iter().filter(|c| !written.contains(&c.id)) {
                let workspace = map.get(&c.id).map(|r| r.workspace_id.to_string());
                tracing::warn!(task = %c.id, workspace = workspace.as_deref().unwrap_or("-"),
                    "result dropped: the lease was lost (task cancelled or reclaimed)");
            }
            for id in &done_ids {
                map.remove(id);
            }
        }
        // Dropping the outcomes frees their slots.
        buffer.clear();
    }
}

/// Extends the leases of running tasks; aborts those whose lease is gone.
async fn heartbeat_loop(
    pool: PgPool,
    running: RunningMap,
    lease: Duration,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let leases: Vec<(Uuid, Uuid)> = match running.lock() {
            Ok(map) => map.iter().map(|(id, r)| (*id, r.lease_token)).collect(),
            Err(_) => continue,
        };
        match lifecycle::heartbeat(&pool, &leases, lease).await {
            Ok(held) => {
                let held: std::collections::HashSet<Uuid> = held.into_iter().collect();
                if let Ok(map) = running.lock() {
                    for (id, token) in &leases {
                        if !held.contains(id)
                            && let Some(r) = map.get(id)
                            && r.lease_token == *token
                        {
                            tracing::info!(task = %id, workspace = %r.workspace_id,
                                "lease lost (cancelled or reclaimed): aborting");
                            r.abort.cancel();
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; will retry"),
        }
    }
}

/// LISTEN for new work (wakes the claim loop) and for cancellations. A cancel notification
/// is a hint: anyone who can connect may `pg_notify('bizq_cancel', id)`, so the run is
/// aborted only once the database confirms its lease is gone ([`lifecycle::lease_is_held`]).
async fn listen(pool: PgPool, running: RunningMap, wake: Arc<Notify>, stop: CancellationToken) {
    let wake_on_work = wake.clone();
    let check_pool = pool.clone();
    crate::listen::listen(
        pool,
        &[CHANNEL_QUEUED, CHANNEL_CANCEL],
        wake,
        stop,
        move |n| {
            if n.channel() != CHANNEL_CANCEL {
                wake_on_work.notify_one();
                return;
            }
            let Ok(id) = n.payload().parse::<Uuid>() else {
                return;
            };
            let Some((token, workspace, abort)) = running.lock().ok().and_then(|map| {
                map.get(&id)
                    .map(|r| (r.lease_token, r.workspace_id, r.abort.clone()))
            }) else {
                return;
            };
            let pool = check_pool.clone();
            tokio::spawn(async move {
                match lifecycle::lease_is_held(&pool, id, token).await {
                    Ok(false) => {
                        tracing::info!(task = %id, %workspace, "cancelled by an admin: aborting");
                        abort.cancel();
                    }
                    Ok(true) => tracing::warn!(task = %id, %workspace,
                        "cancel notification for a task whose lease is still held: ignored"),
                    // The heartbeat checks every lease again shortly.
                    Err(e) => tracing::warn!(task = %id, %workspace, error = %e,
                        "could not check a cancel notification; the heartbeat will"),
                }
            });
        },
    )
    .await
}
