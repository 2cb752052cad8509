//! What every worker and scheduler process does for the ops surface at start and at exit:
//! serve `/metrics` `/healthz` `/readyz` when asked, register in `workers` and heartbeat,
//! deregister on a clean stop.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::config::Config;
use crate::health::Sampler;
use crate::registry::{Liveness, Presence, Registration, Role};

/// `--metrics-addr` and `--log-format` override the config file.
pub fn apply_flags(
    config: &mut Config,
    metrics_addr: Option<String>,
    log_format: Option<crate::config::LogFormat>,
) {
    if let Some(a) = metrics_addr {
        config.ops.metrics_addr = a;
    }
    if let Some(f) = log_format {
        config.ops.log_format = f;
    }
}

/// A running process's ops side; call [`ProcessOps::stop`] after the runtime returned.
pub struct ProcessOps {
    presence: Presence,
}

/// Starts the metrics listener (when `config.ops.metrics_addr` is set) and registers the
/// process. `live` is the runtime's [`Liveness`] (a fresh one for a scheduler).
pub async fn start(
    pool: &PgPool,
    config: &Config,
    id: &str,
    role: Role,
    live: Arc<Liveness>,
    shutdown: CancellationToken,
) -> Result<ProcessOps> {
    let (types, concurrency) = match role {
        Role::Worker => (config.worker.types.clone(), config.worker.concurrency),
        Role::Scheduler => (Vec::new(), 0),
    };
    let mut registration = Registration::this_process(id, role, &types, concurrency);
    let addr = config.ops.metrics_addr.trim();
    if !addr.is_empty() {
        let sampler: Sampler = match role {
            Role::Worker => {
                let live = live.clone();
                Arc::new(move || {
                    crate::metrics::worker_load(live.in_flight(), concurrency);
                    Box::pin(async {})
                })
            }
            Role::Scheduler => {
                crate::metrics::QueueSampler::new(pool.clone(), config.ops.clone()).into_sampler()
            }
        };
        let bound =
            crate::health::serve(addr, pool.clone(), shutdown.clone(), Some(sampler)).await?;
        registration.metrics_addr = Some(bound.to_string());
    }
    let presence = Presence::join(pool, registration, live, &config.ops, shutdown).await?;
    Ok(ProcessOps { presence })
}

impl ProcessOps {
    /// Stops the heartbeat and removes the process from `workers`.
    pub async fn stop(self) {
        self.presence.leave().await;
    }
}
