//! Settings for every BizQ binary: a TOML file (see `config/bizq.toml`), with defaults for
//! everything, and `DATABASE_URL` from the environment.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::{Error, Result};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub worker: WorkerConfig,
    pub scheduler: SchedulerConfig,
    pub retry: RetryConfig,
    pub providers: ProvidersConfig,
    pub ops: OpsConfig,
}

/// What a worker process claims and how it runs it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Tasks run at once by one worker process.
    pub concurrency: usize,
    /// Task type patterns this worker claims; `*` matches any run of characters
    /// (`content.*`). Empty or `["*"]` claims everything.
    pub types: Vec<String>,
    /// How long a claim stays valid without a heartbeat.
    pub lease_seconds: u64,
    /// How often leases of running tasks are extended. Must be well under `lease_seconds`.
    pub heartbeat_ms: u64,
    /// The longest a worker sleeps between claims when no notification arrives.
    pub poll_interval_ms: u64,
    /// Most tasks taken by one claim query.
    pub claim_batch: usize,
    /// Most results written by one completion transaction.
    pub complete_batch: usize,
    /// Completion transactions one worker process keeps in flight at once. One writes the
    /// largest batches, which costs PostgreSQL the least CPU per task (measured best on 2
    /// cores); more let a worker on a database with spare cores write while it commits.
    pub result_writers: usize,
    /// A handler call longer than this fails the attempt (transient: it is retried).
    pub task_timeout_seconds: u64,
    /// On SIGTERM/SIGINT, how long running tasks may take to finish before they are released.
    pub shutdown_grace_seconds: u64,
    /// Attempts a task gets when neither the task row nor `max_attempts` names a number.
    pub default_max_attempts: i32,
    /// Attempts per task type, e.g. `"ai.generate" = 5`.
    pub max_attempts: BTreeMap<String, i32>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 32,
            types: vec!["*".into()],
            lease_seconds: 30,
            heartbeat_ms: 5_000,
            poll_interval_ms: 1_000,
            claim_batch: 200,
            complete_batch: 500,
            result_writers: 1,
            task_timeout_seconds: 120,
            shutdown_grace_seconds: 10,
            default_max_attempts: 3,
            max_attempts: BTreeMap::new(),
        }
    }
}

impl WorkerConfig {
    /// Attempts allowed for a task type.
    pub fn max_attempts_for(&self, task_type: &str) -> i32 {
        self.max_attempts
            .get(task_type)
            .copied()
            .unwrap_or(self.default_max_attempts)
    }

    /// The type patterns as SQL `LIKE` patterns, or `None` for "every type".
    pub fn type_like_patterns(&self) -> Option<Vec<String>> {
        if self.types.is_empty() || self.types.iter().any(|t| t == "*") {
            return None;
        }
        Some(self.types.iter().map(|t| glob_to_like(t)).collect())
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_seconds)
    }
}

/// `content.*` → `content.%`, with LIKE's own wildcards escaped.
pub fn glob_to_like(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len());
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// What happens to the dependents of a task that failed or was cancelled.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DependencyFailurePolicy {
    /// Dependents are cancelled, with `error_details` naming the dependency.
    #[default]
    Cancel,
    /// Dependents go to `escalated` for a person to decide.
    Escalate,
}

impl DependencyFailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Escalate => "escalate",
        }
    }
}

/// The scheduler's loop.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// The longest the scheduler sleeps between passes when no notification arrives.
    pub tick_ms: u64,
    /// Rows handled per statement by admission, promotion and reclaim.
    pub batch: i64,
    pub dependency_failure: DependencyFailurePolicy,
    /// How often partitions, monthly credit resets and index hygiene run.
    pub housekeeping_interval_seconds: u64,
    /// `analytics_events` months kept created ahead of today.
    pub partitions_ahead: i32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            tick_ms: 500,
            batch: 1_000,
            dependency_failure: DependencyFailurePolicy::Cancel,
            housekeeping_interval_seconds: 300,
            partitions_ahead: 3,
        }
    }
}

/// The ops surface: logs, the metrics/health listener, the live-workers registry and the
/// dashboard. See `config/bizq.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// Address for `/metrics`, `/healthz` and `/readyz` (e.g. `127.0.0.1:9464`); empty = off.
    /// Port 0 picks a free port (recorded in the `workers` table).
    pub metrics_addr: String,
    /// `human` (default) or `json`.
    pub log_format: LogFormat,
    /// How often a process refreshes its row in `workers`.
    pub heartbeat_ms: u64,
    /// A `workers` row not refreshed for this long is shown as lost.
    pub worker_lost_after_seconds: u64,
    /// Housekeeping deletes a `workers` row not refreshed for this long.
    pub worker_forget_after_seconds: u64,
    /// Where `bizq dashboard` listens. Anything but loopback needs a token.
    pub dashboard_addr: String,
    /// A file holding the dashboard token (else `$BIZQ_DASHBOARD_TOKEN`).
    pub dashboard_token_file: Option<std::path::PathBuf>,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            metrics_addr: String::new(),
            log_format: LogFormat::Human,
            heartbeat_ms: 5_000,
            worker_lost_after_seconds: 30,
            worker_forget_after_seconds: 86_400,
            dashboard_addr: "127.0.0.1:8080".into(),
            dashboard_token_file: None,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (tracing's default format).
    #[default]
    Human,
    /// One JSON object per line, fields included.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "human" => Ok(Self::Human),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format '{other}' (human or json)")),
        }
    }
}

/// Backoff between attempts of a task that failed with a transient error.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    pub base_ms: u64,
    pub max_ms: u64,
    pub factor: f32,
    pub jitter: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base_ms: 1_000,
            max_ms: 300_000,
            factor: 2.0,
            jitter: true,
        }
    }
}

/// AI providers. Only `mock` exists in this version; real clients plug in beside it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvidersConfig {
    /// Provider used when a task's `ai_provider` is NULL or `auto`.
    pub default: String,
    pub mock: MockProviderConfig,
}

impl Default for ProvidersConfig {
    fn default() -> Self {
        Self {
            default: "mock".into(),
            mock: MockProviderConfig::default(),
        }
    }
}

/// The built-in deterministic provider, for demos, tests and benchmarks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockProviderConfig {
    /// Off unless a config says so: production fleets never answer with mock text.
    pub enabled: bool,
    pub latency_ms: u64,
    /// Share of calls (0.0–1.0) that fail with a transient 503.
    pub failure_rate: f64,
    /// Prompts containing this marker fail with a permanent 400 (for tests and demos).
    pub permanent_failure_marker: Option<String>,
    /// Prompts containing this marker are rate limited on their first attempt: HTTP 429 with
    /// a `Retry-After` of `rate_limit_retry_after_ms` (for tests and demos).
    pub rate_limit_marker: Option<String>,
    pub rate_limit_retry_after_ms: u64,
}

impl Default for MockProviderConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            latency_ms: 0,
            failure_rate: 0.0,
            permanent_failure_marker: None,
            rate_limit_marker: None,
            rate_limit_retry_after_ms: 1000,
        }
    }
}

impl Config {
    /// Reads a TOML file. Unknown keys are an error, so a typo never silently falls back to
    /// a default.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The file named by `path`, else `$BIZQ_CONFIG`, else the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            Some(p) => Self::from_file(p),
            None => match std::env::var_os("BIZQ_CONFIG") {
                Some(p) => Self::from_file(Path::new(&p)),
                None => Ok(Self::default()),
            },
        }
    }

    pub fn validate(&self) -> Result<()> {
        let w = &self.worker;
        if w.concurrency == 0 {
            return Err(Error::Config(
                "worker.concurrency must be at least 1".into(),
            ));
        }
        if w.lease_seconds == 0 || w.heartbeat_ms >= w.lease_seconds * 1000 / 2 {
            return Err(Error::Config(format!(
                "worker.heartbeat_ms ({}) must be under half of worker.lease_seconds ({} s)",
                w.heartbeat_ms, w.lease_seconds
            )));
        }
        if w.default_max_attempts < 1 || w.max_attempts.values().any(|&n| n < 1) {
            return Err(Error::Config("max attempts must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&self.providers.mock.failure_rate) {
            return Err(Error::Config(
                "providers.mock.failure_rate must be between 0 and 1".into(),
            ));
        }
        if self.scheduler.batch < 1
            || w.claim_batch == 0
            || w.complete_batch == 0
            || w.result_writers == 0
        {
            return Err(Error::Config(
                "batch sizes and worker.result_writers must be at least 1".into(),
            ));
        }
        let o = &self.ops;
        if o.heartbeat_ms == 0 || o.heartbeat_ms >= o.worker_lost_after_seconds * 1000 / 2 {
            return Err(Error::Config(format!(
                "ops.heartbeat_ms ({}) must be under half of ops.worker_lost_after_seconds ({} s)",
                o.heartbeat_ms, o.worker_lost_after_seconds
            )));
        }
        if o.worker_forget_after_seconds < o.worker_lost_after_seconds {
            return Err(Error::Config(
                "ops.worker_forget_after_seconds must be at least ops.worker_lost_after_seconds"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// `--database-url`, else `$DATABASE_URL`, else a clear error telling how to get one.
pub fn database_url(flag: Option<String>) -> Result<String> {
    flag.or_else(|| std::env::var("DATABASE_URL").ok())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Error::Config(
                "no database: pass --database-url or set DATABASE_URL \
                 (scripts/db.sh url prints one for a private local PostgreSQL)"
                    .into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns_become_like_patterns() {
        assert_eq!(glob_to_like("content.*"), "content.%");
        assert_eq!(glob_to_like("a_b%"), "a\\_b\\%");
    }

    #[test]
    fn every_shipped_config_file_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("config/ exists") {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                if let Err(e) = Config::from_file(&path) {
                    panic!("{}: {e}", path.display());
                }
                checked += 1;
            }
        }
        assert!(checked >= 3, "bizq.toml, demo.toml and test.toml at least");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::from_toml("[worker]\nconcurency = 3\n").unwrap_err();
        assert!(err.to_string().contains("concurency"), "{err}");
    }

    #[test]
    fn heartbeat_must_fit_in_lease() {
        let err =
            Config::from_toml("[worker]\nlease_seconds = 2\nheartbeat_ms = 1500\n").unwrap_err();
        assert!(err.to_string().contains("heartbeat_ms"), "{err}");
    }

    #[test]
    fn a_worker_needs_a_result_writer() {
        let err = Config::from_toml("[worker]\nresult_writers = 0\n").unwrap_err();
        assert!(err.to_string().contains("result_writers"), "{err}");
        assert_eq!(Config::from_toml("").unwrap().worker.result_writers, 1);
    }

    #[test]
    fn per_type_attempts_override_the_default() {
        let c = Config::from_toml("[worker.max_attempts]\n\"ai.generate\" = 5\n").unwrap();
        assert_eq!(c.worker.max_attempts_for("ai.generate"), 5);
        assert_eq!(c.worker.max_attempts_for("other"), 3);
    }
}
