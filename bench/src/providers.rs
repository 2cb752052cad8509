//! `bizq-bench --only providers`: the real `bizq-worker` calling a stand-in OpenAI-compatible
//! server in this process through its `kind = "openai"` client and the fleet-wide budgets.
//!
//! - **Rate budget:** stand-in at `--provider-latency-ms` (100), `rpm = --provider-rpm`
//!   (6000), 1/2/4 worker processes (`--workers`), a queue deeper than the run can drain. Over
//!   `--provider-seconds` from the first call: requests per minute at the stand-in, and the
//!   most calls any 10-second window held (over every call of the run, drain included).
//! - **Concurrency:** stand-in at `--provider-slow-latency-ms` (2000), one worker with
//!   `concurrency = --provider-concurrency` (1000) and no budgets: the most calls the stand-in
//!   held at once (and on average), tasks per second (first insert to last completion, from
//!   the rows), and the worker's peak resident set (`VmHWM`).
//!
//! Each run gets a fresh database; the last rate run's (`bizq_bench_providers`) and the
//! concurrency run's (`bizq_bench_providers_conc`) are left for inspection.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::PgPool;

use crate::scenarios::{self, BenchArgs, median};
use crate::stand_in::{COMPLETION_TOKENS, Seen, StandIn};
use bizq::fleet;

/// The rate runs' database (recreated for each run).
pub const RATE_DB: &str = "bizq_bench_providers";
/// The concurrency run's database (recreated for each run).
pub const CONCURRENCY_DB: &str = "bizq_bench_providers_conc";

/// The environment variable the stand-in provider's (made-up) key travels in, so the worker
/// builds and sends its `Authorization` header as it would for a real provider.
const KEY_ENV: &str = "BIZQ_BENCH_STANDIN_KEY";
/// The provider's name in the config and in `tasks.ai_provider`.
const PROVIDER: &str = "standin";
/// The model the tasks pin (`tasks.ai_model`).
const MODEL: &str = "bench-model";

/// A fleet config for the stand-in at `base_url`: `concurrency` tasks per worker, the
/// provider's budget lines (`limits`, empty = unlimited), a priced model.
fn config(base_url: &str, concurrency: usize, limits: &str) -> String {
    format!(
        r#"
[worker]
concurrency = {concurrency}
claim_batch = 256
complete_batch = 1000
result_writers = 1
heartbeat_ms = 5000
lease_seconds = 60
poll_interval_ms = 200

[scheduler]
tick_ms = 50
batch = 5000

[providers]
default = "{PROVIDER}"

[providers.{PROVIDER}]
kind = "openai"
base_url = "{base_url}"
api_key_env = "{KEY_ENV}"
timeout_seconds = 30
{limits}

[models."{MODEL}"]
provider = "{PROVIDER}"
upstream = "{MODEL}"
input_usd_per_mtok = 0.40
cached_input_usd_per_mtok = 0.10
output_usd_per_mtok = 1.60
tier = "standard"
"#
    )
}

/// Inserts `n` `ai.generate` tasks pinned to the stand-in's model, spread over the
/// workspaces, in chunks (one statement per chunk, like product code inserting in bulk).
async fn insert_tasks(pool: &PgPool, n: i64) -> anyhow::Result<()> {
    let mut done = 0;
    while done < n {
        let chunk = (n - done).min(50_000);
        sqlx::query(
            "INSERT INTO tasks (workspace_id, type, category, name, input, priority, ai_model)
             SELECT w.ids[1 + g % 8], 'ai.generate', 'content', 'bench',
                    jsonb_build_object('prompt', 'bench prompt ' || g, 'max_tokens', $3::int), 1 + g % 10, $2
               FROM generate_series($4 + 1, $4 + $1) g,
                    (SELECT array_agg(id ORDER BY slug) AS ids FROM workspaces) w",
        )
        .bind(chunk)
        .bind(MODEL)
        .bind(COMPLETION_TOKENS as i32)
        .bind(done)
        .execute(pool)
        .await?;
        done += chunk;
    }
    Ok(())
}

/// Tasks the stand-in's provider completed (`ai_provider` is recorded at completion).
async fn completed_by_stand_in(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE status = 'completed' AND ai_provider = $1",
    )
    .bind(PROVIDER)
    .fetch_one(pool)
    .await?)
}

/// A fresh database with the workspaces, a scheduler and `workers` workers on `config`.
async fn start_fleet(
    url: &str,
    db: &str,
    args: &BenchArgs,
    dir: &Path,
    config: &str,
    workers: usize,
    label: &str,
) -> anyhow::Result<(PgPool, Vec<fleet::Member>)> {
    let (bench_url, pool) = scenarios::fresh_db_named(url, db).await?;
    scenarios::workspaces(&pool).await?;
    let path = dir.join(format!("{label}.toml"));
    std::fs::write(&path, config)?;
    let env = [(KEY_ENV, "sk-bench-stand-in-not-a-real-key")];
    let mut members = vec![fleet::spawn(
        "scheduler",
        &format!("{label}-scheduler"),
        &bench_url,
        &path,
        &[],
        &[],
        scenarios::log_path(args, &format!("{label}-scheduler")).as_deref(),
    )?];
    for i in 0..workers {
        let name = format!("{label}-worker-{i}");
        members.push(fleet::spawn(
            "worker",
            &name,
            &bench_url,
            &path,
            &[],
            &env,
            scenarios::log_path(args, &name).as_deref(),
        )?);
    }
    Ok((pool, members))
}

/// Stops the fleet and fails if a member did not exit cleanly (a worker that could not start
/// would otherwise show up only as a low figure).
async fn stop_fleet(members: Vec<fleet::Member>) -> anyhow::Result<()> {
    for (name, code) in fleet::stop(members).await {
        if code != Some(0) {
            bail!("{name} exited with {code:?} (rerun with --logs DIR to see why)");
        }
    }
    Ok(())
}

/// One rate-budget run's figures.
#[derive(Debug, Clone)]
struct RateRun {
    /// Calls that arrived within `seconds` of the first.
    in_window: usize,
    seconds: f64,
    /// The most calls any 10-second window held, over every call of the run.
    worst_10s: usize,
    seen: Seen,
    completed: i64,
}

impl RateRun {
    fn per_minute(&self) -> f64 {
        self.in_window as f64 / self.seconds * 60.0
    }
}

/// The most arrivals (sorted) within any `window` starting at an arrival.
fn worst_window(arrivals: &[Instant], window: Duration) -> usize {
    let mut worst = 0;
    let mut end = 0;
    for (i, start) in arrivals.iter().enumerate() {
        end = end.max(i);
        while end < arrivals.len() && arrivals[end] < *start + window {
            end += 1;
        }
        worst = worst.max(end - i);
    }
    worst
}

async fn rate_run(
    url: &str,
    args: &BenchArgs,
    dir: &Path,
    workers: usize,
) -> anyhow::Result<RateRun> {
    let stand_in = StandIn::start(Duration::from_millis(args.provider_latency_ms)).await?;
    let config = config(
        &stand_in.base_url(),
        args.provider_worker_concurrency,
        &format!("rpm = {}", args.provider_rpm),
    );
    let label = format!("providers-rate-{workers}");
    let (pool, members) = start_fleet(url, RATE_DB, args, dir, &config, workers, &label).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // let the fleet connect and go idle
    // A queue the budget cannot drain within the run: a fifth more than the run may take.
    let seconds = args.provider_seconds as f64;
    let tasks = (args.provider_rpm as f64 / 60.0 * seconds * 1.2).ceil() as i64 + 100;
    insert_tasks(&pool, tasks).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(t) = stand_in.first_arrival() {
            break t;
        }
        if Instant::now() > deadline {
            stop_fleet(members).await?;
            bail!("no call reached the stand-in within 60 s of the inserts");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let window = Duration::from_secs_f64(seconds);
    tokio::time::sleep_until((first + window).into()).await;
    stop_fleet(members).await?;
    let seen = stand_in.seen();
    let completed = completed_by_stand_in(&pool).await?;
    pool.close().await;
    let in_window = seen
        .arrivals
        .iter()
        .filter(|t| **t < first + window)
        .count();
    Ok(RateRun {
        in_window,
        seconds,
        worst_10s: worst_window(&seen.arrivals, Duration::from_secs(10)),
        seen,
        completed,
    })
}

/// One concurrency run's figures.
#[derive(Debug, Clone)]
struct ConcurrencyRun {
    tasks_per_second: f64,
    peak_rss_bytes: u64,
    seen: Seen,
    completed: i64,
}

async fn concurrency_run(
    url: &str,
    args: &BenchArgs,
    dir: &Path,
) -> anyhow::Result<ConcurrencyRun> {
    let stand_in = StandIn::start(Duration::from_millis(args.provider_slow_latency_ms)).await?;
    let config = config(&stand_in.base_url(), args.provider_concurrency, "");
    let (pool, members) = start_fleet(
        url,
        CONCURRENCY_DB,
        args,
        dir,
        &config,
        1,
        "providers-concurrency",
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tasks = args.provider_tasks;
    insert_tasks(&pool, tasks).await?;
    let started = Instant::now();
    loop {
        let done = completed_by_stand_in(&pool).await?;
        if done >= tasks {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            stop_fleet(members).await?;
            bail!("the concurrency run completed {done} of {tasks} tasks in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let worker = members
        .iter()
        .find(|m| m.name.ends_with("worker-0"))
        .context("the concurrency run has no worker")?;
    let peak_rss_bytes = worker.peak_rss_bytes()?;
    stop_fleet(members).await?;
    let seen = stand_in.seen();
    let completed = completed_by_stand_in(&pool).await?;
    let span = scenarios::span_seconds(&pool).await?;
    pool.close().await;
    Ok(ConcurrencyRun {
        tasks_per_second: completed as f64 / span,
        peak_rss_bytes,
        seen,
        completed,
    })
}

fn list(xs: &[f64], digits: usize) -> String {
    xs.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Both parts, `args.rounds` rounds each (worker counts alternating within a round); medians.
pub async fn run(url: &str, args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    let mut rate: Vec<(usize, Vec<RateRun>)> =
        args.workers.iter().map(|&w| (w, Vec::new())).collect();
    for round in 1..=args.rounds {
        for (w, runs) in &mut rate {
            eprintln!(
                "round {round}/{}: providers, rate budget with {w} worker process(es), {} s ...",
                args.rounds, args.provider_seconds
            );
            runs.push(rate_run(url, args, dir, *w).await?);
        }
    }
    let share = args.provider_rpm as f64 / 6.0;
    println!(
        "providers, rate budget: stand-in at {} ms, rpm = {}, {} tasks in flight per worker, {} s from the first call, median of {} rounds:",
        args.provider_latency_ms,
        args.provider_rpm,
        args.provider_worker_concurrency,
        args.provider_seconds,
        args.rounds
    );
    for (w, runs) in &rate {
        let rpm: Vec<f64> = runs.iter().map(RateRun::per_minute).collect();
        let worst: Vec<f64> = runs.iter().map(|r| r.worst_10s as f64).collect();
        println!(
            "  workers={w}  {:>7.0} requests/min ({:.1}% of the budget; rounds: {})  worst 10 s window {:.0} calls ({:.1}% of its {share:.0} share; rounds: {})",
            median(&rpm),
            median(&rpm) / args.provider_rpm as f64 * 100.0,
            list(&rpm, 0),
            median(&worst),
            median(&worst) / share * 100.0,
            list(&worst, 0),
        );
        for (i, r) in runs.iter().enumerate() {
            println!(
                "    round {}: stand-in received {} calls ({} in the {:.0} s window), answered {}; tasks completed {}",
                i + 1,
                r.seen.arrivals.len(),
                r.in_window,
                r.seconds,
                r.seen.answered,
                r.completed
            );
        }
    }

    let mut conc = Vec::new();
    for round in 1..=args.rounds {
        eprintln!(
            "round {round}/{}: providers, concurrency {} with {} ms calls, {} tasks ...",
            args.rounds,
            args.provider_concurrency,
            args.provider_slow_latency_ms,
            args.provider_tasks
        );
        conc.push(concurrency_run(url, args, dir).await?);
    }
    let peak: Vec<f64> = conc.iter().map(|c| c.seen.peak_in_flight as f64).collect();
    let tps: Vec<f64> = conc.iter().map(|c| c.tasks_per_second).collect();
    let rss: Vec<f64> = conc.iter().map(|c| c.peak_rss_bytes as f64 / 1e6).collect();
    println!(
        "providers, concurrency: stand-in at {} ms, one worker with concurrency = {}, no budgets, {} tasks, median of {} rounds:",
        args.provider_slow_latency_ms, args.provider_concurrency, args.provider_tasks, args.rounds
    );
    println!(
        "  calls in flight at the stand-in, peak  {:>7.0}  (rounds: {})",
        median(&peak),
        list(&peak, 0)
    );
    let latency = Duration::from_millis(args.provider_slow_latency_ms);
    let mean: Vec<f64> = conc
        .iter()
        .map(|c| c.seen.mean_in_flight(latency))
        .collect();
    println!(
        "  calls in flight at the stand-in, mean  {:>7.0}  (first call to last answer; rounds: {})",
        median(&mean),
        list(&mean, 0)
    );
    println!(
        "  tasks/s (first insert to last completion)  {:>7.0}  (rounds: {})",
        median(&tps),
        list(&tps, 0)
    );
    println!(
        "  worker peak RSS (VmHWM)  {:>7.1} MB  (rounds: {})",
        median(&rss),
        list(&rss, 1)
    );
    for (i, c) in conc.iter().enumerate() {
        println!(
            "    round {}: stand-in received {} calls, answered {}; tasks completed {}",
            i + 1,
            c.seen.arrivals.len(),
            c.seen.answered,
            c.completed
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worst window counts the arrivals of the busiest 10 s, its end excluded.
    #[test]
    fn worst_window_finds_the_busiest_stretch() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let arrivals = [
            at(0),
            at(1_000),
            at(9_999),
            at(10_000),
            at(10_500),
            at(19_000),
        ];
        assert_eq!(worst_window(&arrivals, Duration::from_secs(10)), 4);
        assert_eq!(worst_window(&[], Duration::from_secs(10)), 0);
    }
}
