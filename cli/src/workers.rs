//! `bizq workers`: the registered schedulers and workers, alive, draining or lost.

use bizq::Config;
use bizq::registry;
use sqlx::PgPool;

/// Prints one line per registered process. Lost ones (not seen for
/// `ops.worker_lost_after_seconds`) are marked LOST; housekeeping deletes them later.
pub async fn list(pool: &PgPool, config: &Config) -> anyhow::Result<()> {
    let rows = registry::list(pool, &config.ops).await?;
    if rows.is_empty() {
        println!("no worker or scheduler is registered");
        return Ok(());
    }
    println!(
        "{:<32} {:<9} {:<8} {:<20} {:>7} {:<8} {:>9} {:>10} {:>11}  types",
        "id", "role", "state", "host", "pid", "version", "in flight", "last seen", "last claim"
    );
    let now = chrono::Utc::now();
    for w in &rows {
        let state = if w.state == "lost" {
            "LOST".to_string()
        } else {
            w.state.clone()
        };
        let in_flight = match w.role.as_str() {
            "worker" => format!("{}/{}", w.in_flight, w.concurrency),
            _ => "-".into(),
        };
        let last_claim = w.last_claim_at.map_or("-".into(), |t| {
            ago((now - t).num_milliseconds().max(0) as f64 / 1000.0)
        });
        let types = if w.types.is_empty() {
            "-".to_string()
        } else {
            w.types.join(",")
        };
        println!(
            "{:<32} {:<9} {:<8} {:<20} {:>7} {:<8} {:>9} {:>10} {:>11}  {}",
            w.id,
            w.role,
            state,
            w.host,
            w.pid,
            w.version,
            in_flight,
            ago(w.seen_ago_s),
            last_claim,
            types
        );
    }
    let lost = rows.iter().filter(|w| w.state == "lost").count();
    println!(
        "{} registered, {} alive, {} lost (not seen for {} s; forgotten after {} s)",
        rows.len(),
        rows.len() - lost,
        lost,
        config.ops.worker_lost_after_seconds,
        config.ops.worker_forget_after_seconds
    );
    Ok(())
}

/// `4.2s ago`, `3m ago`, `2h ago`.
fn ago(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s ago")
    } else if s < 3600.0 {
        format!("{}m ago", (s / 60.0) as u64)
    } else {
        format!("{}h ago", (s / 3600.0) as u64)
    }
}
