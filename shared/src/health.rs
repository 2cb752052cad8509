//! The ops listener of a worker or scheduler (`--metrics-addr`): `/metrics` (Prometheus
//! text), `/healthz` (the process is alive) and `/readyz` (database reachable, LISTEN
//! connected, not shutting down).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// LISTEN connections of this process that are up now (see [`ListenerUp`]).
static LISTENERS_UP: AtomicI64 = AtomicI64::new(0);

/// Held by a LISTEN loop while its connection is up; `/readyz` needs one.
pub struct ListenerUp(());

impl ListenerUp {
    pub fn new() -> Self {
        LISTENERS_UP.fetch_add(1, Ordering::SeqCst);
        Self(())
    }
}

impl Default for ListenerUp {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ListenerUp {
    fn drop(&mut self) {
        LISTENERS_UP.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether a LISTEN connection of this process is up.
pub fn listening() -> bool {
    LISTENERS_UP.load(Ordering::SeqCst) > 0
}

/// Refreshes gauges just before `/metrics` renders (queue depth, in-flight).
pub type Sampler = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Clone)]
struct Ops {
    pool: PgPool,
    shutdown: CancellationToken,
    metrics: PrometheusHandle,
    sampler: Option<Sampler>,
}

/// Serves the ops endpoints on `addr` until the process exits. Returns the bound address
/// (port 0 picks a free one). `shutdown` is the process's SIGTERM token: once it fires,
/// `/readyz` answers 503 while the process drains.
pub async fn serve(
    addr: &str,
    pool: PgPool,
    shutdown: CancellationToken,
    sampler: Option<Sampler>,
) -> Result<SocketAddr> {
    let metrics = crate::metrics::install()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on metrics address {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("metrics address {addr}: {e}")))?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Ops {
            pool,
            shutdown,
            metrics,
            sampler,
        });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}

async fn metrics_page(State(ops): State<Ops>) -> Response {
    if let Some(sample) = &ops.sampler {
        // A slow database must not hang the scrape: stale gauges are better than none.
        let _ = tokio::time::timeout(Duration::from_secs(5), sample()).await;
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ops.metrics.render(),
    )
        .into_response()
}

/// Why the process is not ready, or `None` when it is.
pub async fn not_ready(pool: &PgPool, shutdown: &CancellationToken) -> Option<&'static str> {
    if shutdown.is_cancelled() {
        return Some("shutting down");
    }
    if !listening() {
        return Some("LISTEN not connected");
    }
    let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool);
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => None,
        _ => Some("database unreachable"),
    }
}

async fn readyz(State(ops): State<Ops>) -> Response {
    match not_ready(&ops.pool, &ops.shutdown).await {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}
