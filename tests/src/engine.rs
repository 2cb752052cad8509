//! Support for the engine tests: workspaces with credits, the test config, in-process
//! fleets, real `bizq-worker`/`bizq-scheduler` processes, and waiting for conditions.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bizq::config::Config;
use bizq::lifecycle::{self, NewTask};
use bizq::scheduler::{Scheduler, SchedulerStats};
use bizq::worker::{Worker, WorkerStats};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// `config/test.toml`: the mock provider at 0 ms, short leases, fast ticks.
pub fn test_config() -> Config {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/test.toml");
    Config::from_file(std::path::Path::new(path)).expect("config/test.toml parses")
}

/// A workspace with the given balance and a monthly limit that does not get in the way.
pub async fn workspace(pool: &PgPool, credits: i32) -> anyhow::Result<Uuid> {
    let slug = format!("ws-{}", Uuid::new_v4().simple());
    let id = sqlx::query_scalar(
        "INSERT INTO workspaces (name, slug, credits_balance, monthly_credit_limit)
         VALUES ($1, $1, $2, 100000000) RETURNING id",
    )
    .bind(slug)
    .bind(credits)
    .fetch_one(pool)
    .await?;
    Ok(id)
}

/// Enqueues an `ai.generate` task.
pub async fn generate(
    pool: &PgPool,
    ws: Uuid,
    prompt: &str,
    priority: i32,
    deps: &[Uuid],
) -> anyhow::Result<Uuid> {
    let mut t = NewTask::generate(ws, prompt);
    t.priority = priority;
    t.depends_on = deps.to_vec();
    Ok(lifecycle::enqueue(pool, &t).await?)
}

/// A workspace's credit figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    pub balance: i32,
    pub reserved: i32,
    pub used: i32,
}

pub async fn credits(pool: &PgPool, ws: Uuid) -> anyhow::Result<Credits> {
    let (balance, reserved, used): (i32, i32, i32) = sqlx::query_as(
        "SELECT credits_balance, credits_reserved, credits_used_this_month FROM workspaces WHERE id = $1",
    )
    .bind(ws)
    .fetch_one(pool)
    .await?;
    Ok(Credits {
        balance,
        reserved,
        used,
    })
}

pub async fn status(pool: &PgPool, id: Uuid) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await?)
}

pub async fn error_code(pool: &PgPool, id: Uuid) -> anyhow::Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT error_details ->> 'code' FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

/// Asserts a task's status and `error_details.code`, naming the task in the failure.
pub async fn assert_state(
    pool: &PgPool,
    id: Uuid,
    expected_status: &str,
    expected_code: Option<&str>,
) -> anyhow::Result<()> {
    let (status, code): (String, Option<String>) =
        sqlx::query_as("SELECT status, error_details ->> 'code' FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?;
    assert_eq!(
        (status.as_str(), code.as_deref()),
        (expected_status, expected_code),
        "task {id}: status and error code"
    );
    Ok(())
}

/// Polls `sql` (a query returning one boolean) until true, or fails after `timeout`.
pub async fn wait_for(pool: &PgPool, sql: &'static str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let done: bool = match sqlx::query_scalar(sql).fetch_one(pool).await {
            Ok(v) => v,
            Err(_) if Instant::now() < deadline => false,
            Err(e) => return Err(e.into()),
        };
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            let counts: Vec<(String, i64)> =
                sqlx::query_as("SELECT status, count(*) FROM tasks GROUP BY status ORDER BY 1")
                    .fetch_all(pool)
                    .await
                    .unwrap_or_default();
            anyhow::bail!(
                "timed out after {timeout:?} waiting for: {sql}\n  task counts: {counts:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connections the `bizq-scheduler` binary opens (scheduler/src/main.rs).
pub const SCHEDULER_CONNECTIONS: u32 = 4;

/// Schedulers and workers running as tasks of the test's own runtime. Each opens its own
/// pool, sized as its binary sizes it (`bizq::worker::connections_needed` for a worker,
/// [`SCHEDULER_CONNECTIONS`] for a scheduler), so a fleet that needs more connections than a
/// deployed process has fails here too.
pub struct InProcessFleet {
    pub stop: CancellationToken,
    schedulers: Vec<JoinHandle<bizq::Result<SchedulerStats>>>,
    workers: Vec<JoinHandle<bizq::Result<WorkerStats>>>,
}

impl InProcessFleet {
    /// Starts the fleet on the database `pool` is connected to, with the dependency-failure
    /// policy of `config` (as the binaries do). Each member connects as it starts.
    pub fn start(pool: &PgPool, config: &Config, schedulers: usize, workers: usize) -> Self {
        let stop = CancellationToken::new();
        let url = url_of(pool);
        let settings = |application_name: String, max_connections: u32| bizq::db::PoolSettings {
            application_name,
            max_connections,
            dependency_failure: config.scheduler.dependency_failure,
        };
        let schedulers = (0..schedulers)
            .map(|i| {
                let (url, config, stop) = (url.clone(), config.clone(), stop.clone());
                let settings = settings(format!("bizq-scheduler test-{i}"), SCHEDULER_CONNECTIONS);
                tokio::spawn(async move {
                    let pool = bizq::db::connect(&url, &settings).await?;
                    Scheduler::new(pool, config).run(stop).await
                })
            })
            .collect();
        let workers = (0..workers)
            .map(|i| {
                let (url, config, stop) = (url.clone(), config.clone(), stop.clone());
                let settings = settings(
                    format!("bizq-worker test-worker-{i}"),
                    bizq::worker::connections_needed(&config.worker),
                );
                tokio::spawn(async move {
                    let pool = bizq::db::connect(&url, &settings).await?;
                    Worker::new(pool, config, format!("test-worker-{i}"))?
                        .run(stop)
                        .await
                })
            })
            .collect();
        Self {
            stop,
            schedulers,
            workers,
        }
    }

    /// Stops everything and returns the workers' stats.
    pub async fn shutdown(self) -> anyhow::Result<Vec<WorkerStats>> {
        self.stop.cancel();
        for s in self.schedulers {
            s.await??;
        }
        let mut out = Vec::new();
        for w in self.workers {
            out.push(w.await??);
        }
        Ok(out)
    }
}

/// A `postgres://` URL for the database `pool` is connected to (trust auth, as in tests).
pub fn url_of(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().unwrap_or("postgres")
    )
}

/// Path of a binary of this workspace (`cargo build --bins` must have run: scripts/test.sh does).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let path = target.join(profile).join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A real `bizq-worker` or `bizq-scheduler` process.
pub struct Process {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `bizq-<kind>` against `url` with a config file written from `config_toml`.
    pub fn start(kind: &str, url: &str, config_toml: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("bizq-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml)?;
        let log = dir.join(format!("{kind}.log"));
        let file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(binary(&format!("bizq-{kind}")))
            .arg("--config")
            .arg(&config)
            .args(extra)
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends a signal (`-TERM`, `-KILL`) with kill(1).
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let ok = std::process::Command::new("kill")
            .arg(sig)
            .arg(self.pid().to_string())
            .status()?
            .success();
        anyhow::ensure!(ok, "kill {sig} {} failed", self.pid());
        Ok(())
    }

    /// SIGTERM, then the exit code (fails if it takes over 30 s).
    pub async fn terminate(mut self) -> anyhow::Result<Option<i32>> {
        self.signal("-TERM")?;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(status.code())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The test config as TOML text, with overrides given as (`section.key`, TOML value), e.g.
/// `("providers.mock.latency_ms", "3000")`.
pub fn config_toml(overrides: &[(&str, &str)]) -> String {
    let base = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/test.toml"))
        .expect("config/test.toml");
    let mut doc: toml::Table = base.parse().expect("config/test.toml is TOML");
    for (path, value) in overrides {
        let parts: Vec<&str> = path.split('.').collect();
        let (key, sections) = parts.split_last().expect("non-empty path");
        let mut table = &mut doc;
        for s in sections {
            table = table
                .entry(s.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .expect("a section");
        }
        let v: toml::Table = format!("v = {value}").parse().expect("a TOML value");
        table.insert(key.to_string(), v["v"].clone());
    }
    let text = toml::to_string(&doc).expect("serialises");
    Config::from_toml(&text).expect("the overridden config is valid");
    text
}

/// [`config_toml`] parsed.
pub fn config_with(overrides: &[(&str, &str)]) -> Config {
    Config::from_toml(&config_toml(overrides)).expect("valid config")
}

/// A pool on the test's database opened the way the binaries open one (the dependency-failure
/// policy of `config` set), for the test's own engine calls while a fleet runs.
/// [`InProcessFleet::start`] takes it to find the database; the fleet's members open their
/// own pools, sized as the binaries size theirs.
pub async fn engine_pool(pool: &PgPool, config: &Config) -> anyhow::Result<PgPool> {
    Ok(bizq::db::connect(
        &url_of(pool),
        &bizq::db::PoolSettings {
            application_name: "bizq-test".into(),
            max_connections: 20,
            dependency_failure: config.scheduler.dependency_failure,
        },
    )
    .await?)
}
