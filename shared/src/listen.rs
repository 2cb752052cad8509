//! LISTEN that survives lost connections: every notification goes to a callback, and the
//! owner's loop is woken after each (re)connect, since notifications may have been missed
//! meanwhile. Notifications are hints only; callers keep polling as the backstop.

use std::sync::Arc;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgNotification};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::retry::pause_after_db_errors;

/// Listens on `channels` until `stop`, reconnecting with backoff.
pub async fn listen(
    pool: PgPool,
    channels: &'static [&'static str],
    wake: Arc<Notify>,
    stop: CancellationToken,
    mut on_notification: impl FnMut(&PgNotification) + Send,
) {
    let mut failures = 0u32;
    loop {
        let connected = match PgListener::connect_with(&pool).await {
            Ok(mut l) => l.listen_all(channels.iter().copied()).await.map(|()| l),
            Err(e) => Err(e),
        };
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, ?channels, "LISTEN failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause_after_db_errors(failures)) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        failures = 0;
        let _up = crate::health::ListenerUp::new();
        wake.notify_one();
        loop {
            let n = tokio::select! {
                n = listener.recv() => n,
                _ = stop.cancelled() => return,
            };
            match n {
                Ok(n) => on_notification(&n),
                Err(e) => {
                    tracing::debug!(error = %e, ?channels, "LISTEN connection lost; reconnecting");
                    break;
                }
            }
        }
    }
}
