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
    /// Models tasks may use, by the name in `tasks.ai_model`.
    pub models: BTreeMap<String, ModelConfig>,
    pub billing: BillingConfig,
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
    /// The scheduler's queue gauges on `/metrics` (depth, oldest queued, blocked, parked,
    /// workers) come from a sample of the database at most this old: however many scrapers
    /// ask, the counting queries run at most once per this interval. 0 samples on every
    /// scrape.
    pub metrics_sample_max_age_ms: u64,
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
            metrics_sample_max_age_ms: 5_000,
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

/// AI providers: `default` and `park_seconds`, the built-in `[providers.mock]`, and any number
/// of named real providers (`[providers.<name>]` with a `kind`).
#[derive(Debug, Clone)]
pub struct ProvidersConfig {
    /// Provider used when a task names none (or `auto`) and no `[models]` entry applies.
    pub default: String,
    /// How long a provider that answered 401/403/402 (or an exhausted quota) stays parked
    /// before it is probed again.
    pub park_seconds: u64,
    pub mock: MockProviderConfig,
    /// The real providers by name (`[providers.openai]`, `[providers.azure]`, …).
    pub endpoints: BTreeMap<String, ProviderConfig>,
}

impl Default for ProvidersConfig {
    fn default() -> Self {
        Self {
            default: "mock".into(),
            park_seconds: 60,
            mock: MockProviderConfig::default(),
            endpoints: BTreeMap::new(),
        }
    }
}

// Hand-written because serde cannot combine `flatten` (the named providers) with
// `deny_unknown_fields`: scalar keys are the settings, every table is a provider.
impl<'de> Deserialize<'de> for ProvidersConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut table: BTreeMap<String, toml::Value> = BTreeMap::deserialize(d)?;
        let mut out = Self::default();
        if let Some(v) = table.remove("default") {
            out.default = v
                .try_into()
                .map_err(|e| D::Error::custom(format!("providers.default: {e}")))?;
        }
        if let Some(v) = table.remove("park_seconds") {
            out.park_seconds = v
                .try_into()
                .map_err(|e| D::Error::custom(format!("providers.park_seconds: {e}")))?;
        }
        if let Some(v) = table.remove("mock") {
            out.mock = v
                .try_into()
                .map_err(|e| D::Error::custom(format!("providers.mock: {e}")))?;
        }
        for (name, v) in table {
            if !v.is_table() {
                return Err(D::Error::custom(format!(
                    "unknown key providers.{name} (providers take default, park_seconds, \
                     [providers.mock] and [providers.<name>] tables)"
                )));
            }
            let p: ProviderConfig = v
                .try_into()
                .map_err(|e| D::Error::custom(format!("providers.{name}: {e}")))?;
            out.endpoints.insert(name, p);
        }
        Ok(out)
    }
}

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI Chat Completions, and compatible servers (Azure, vLLM, Ollama, LiteLLM).
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// The built-in mock (`[providers.mock]` only).
    Mock,
}

/// One real provider (`[providers.<name>]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// `https://api.openai.com/v1`, `https://api.anthropic.com`, `http://localhost:11434/v1`.
    pub base_url: String,
    /// The environment variable holding the API key, read at start-up (never from this
    /// file). None: no key is sent (Ollama, vLLM without `--api-key`).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Header carrying the key: `authorization` gets `Bearer KEY`, any other name the bare
    /// key (`api-key` for Azure). Default: `authorization` for openai, `x-api-key` for anthropic.
    #[serde(default)]
    pub auth_header: Option<String>,
    /// The request field for the answer's length limit (kind openai): `max_completion_tokens`
    /// (OpenAI, Azure, vLLM) or `max_tokens` (older compatible servers).
    #[serde(default = "default_max_tokens_field")]
    pub max_tokens_field: String,
    /// Query parameters added to every request, e.g. `{"api-version" = "2024-10-21"}`.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Fleet-wide budgets (omit = unlimited): requests and tokens per minute, calls in flight.
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub input_tpm: Option<u64>,
    #[serde(default)]
    pub output_tpm: Option<u64>,
    #[serde(default)]
    pub max_in_flight: Option<u64>,
    /// One HTTP call, from send to the last byte of the answer.
    #[serde(default = "default_provider_timeout")]
    pub timeout_seconds: u64,
}

fn default_max_tokens_field() -> String {
    "max_completion_tokens".into()
}

fn default_provider_timeout() -> u64 {
    120
}

/// Price class of a model, matched against a workspace's `ai_preferences.quality_tier`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord, Default)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Economy,
    #[default]
    Standard,
    Premium,
}

impl Tier {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "economy" => Some(Self::Economy),
            "standard" => Some(Self::Standard),
            "premium" => Some(Self::Premium),
            _ => None,
        }
    }
}

/// A model tasks may use (`[models."<name>"]`). Every model has prices: a model without
/// them is a start-up error, never a free call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A `[providers.<name>]` (or `mock`).
    pub provider: String,
    /// The name sent to the provider (Azure deployment, vLLM served name); default: the key.
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub input_usd_per_mtok: Option<f64>,
    /// Price of cached input tokens (OpenAI); default: the input price.
    #[serde(default)]
    pub cached_input_usd_per_mtok: Option<f64>,
    #[serde(default)]
    pub output_usd_per_mtok: Option<f64>,
    #[serde(default)]
    pub tier: Tier,
    /// `max_tokens` sent when the task's input names none (Anthropic requires one).
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

/// How provider spend becomes credits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingConfig {
    /// `actual_cost = ceil(usd × credits_per_usd)`, at least 1.
    pub credits_per_usd: u64,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            credits_per_usd: 100,
        }
    }
}

/// An API key read from the environment. Its `Debug` prints `***`, and it has no `Display`,
/// so it cannot reach a log line or an error message by accident.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Reads `var`; a missing or empty variable is a configuration error naming the variable
    /// and the provider, never a value.
    pub fn from_env(provider: &str, var: &str) -> Result<Self> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Self(v.trim().to_string())),
            _ => Err(Error::Config(format!(
                "providers.{provider}.api_key_env names {var}, which is not set in the environment"
            ))),
        }
    }

    /// The key itself, for the one place that builds the request header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
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
        self.validate_providers()?;
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

impl Config {
    /// Every model names a known provider and has prices; every provider has a usable URL.
    /// API keys are checked when a worker starts (`Providers::from_config`), where they are
    /// read; the CLI and the scheduler never need them.
    fn validate_providers(&self) -> Result<()> {
        let p = &self.providers;
        if p.endpoints.contains_key("default") || p.endpoints.contains_key("park_seconds") {
            return Err(Error::Config("providers: reserved provider name".into()));
        }
        for (name, e) in &p.endpoints {
            if e.kind == ProviderKind::Mock {
                return Err(Error::Config(format!(
                    "providers.{name}: kind \"mock\" is only for [providers.mock]; use openai or anthropic"
                )));
            }
            if !(e.base_url.starts_with("http://") || e.base_url.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "providers.{name}.base_url must start with http:// or https://"
                )));
            }
            if e.timeout_seconds == 0 {
                return Err(Error::Config(format!(
                    "providers.{name}.timeout_seconds must be at least 1"
                )));
            }
        }
        let known = |n: &str| n == "mock" || p.endpoints.contains_key(n);
        if !known(&p.default) {
            return Err(Error::Config(format!(
                "providers.default names '{}', which is neither mock nor a [providers.<name>]",
                p.default
            )));
        }
        for (name, m) in &self.models {
            if !known(&m.provider) {
                return Err(Error::Config(format!(
                    "models.\"{name}\".provider names '{}', which is not a configured provider",
                    m.provider
                )));
            }
            for (key, v) in [
                ("input_usd_per_mtok", m.input_usd_per_mtok),
                ("output_usd_per_mtok", m.output_usd_per_mtok),
            ] {
                match v {
                    None => {
                        return Err(Error::Config(format!(
                            "models.\"{name}\" has no {key}: every model needs its prices \
                             (a model is never charged as free)"
                        )));
                    }
                    Some(x) if !x.is_finite() || x < 0.0 => {
                        return Err(Error::Config(format!(
                            "models.\"{name}\".{key} must be a price in USD per million tokens"
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        if self.billing.credits_per_usd == 0 {
            return Err(Error::Config(
                "billing.credits_per_usd must be at least 1".into(),
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

    const PROVIDERS: &str = r#"
[providers]
default = "mock"
park_seconds = 30
[providers.mock]
enabled = true
[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
rpm = 500
[providers.azure]
kind = "openai"
base_url = "https://r.openai.azure.com/openai/deployments/d"
auth_header = "api-key"
query = { "api-version" = "2024-10-21" }
[providers.anthropic]
kind = "anthropic"
base_url = "https://api.anthropic.com"
[models."gpt-4.1-mini"]
provider = "openai"
input_usd_per_mtok = 0.40
cached_input_usd_per_mtok = 0.10
output_usd_per_mtok = 1.60
tier = "standard"
[billing]
credits_per_usd = 1000
"#;

    #[test]
    fn providers_models_and_billing_parse() {
        let c = Config::from_toml(PROVIDERS).unwrap();
        assert_eq!(c.providers.park_seconds, 30);
        assert!(c.providers.mock.enabled);
        assert_eq!(c.providers.endpoints.len(), 3);
        let azure = &c.providers.endpoints["azure"];
        assert_eq!(azure.kind, ProviderKind::OpenAi);
        assert_eq!(azure.auth_header.as_deref(), Some("api-key"));
        assert_eq!(azure.query["api-version"], "2024-10-21");
        assert_eq!(c.providers.endpoints["openai"].rpm, Some(500));
        assert_eq!(c.providers.endpoints["anthropic"].timeout_seconds, 120);
        assert_eq!(c.models["gpt-4.1-mini"].tier, Tier::Standard);
        assert_eq!(c.billing.credits_per_usd, 1000);
        assert_eq!(Config::from_toml("").unwrap().billing.credits_per_usd, 100);
    }

    #[test]
    fn provider_and_model_mistakes_are_config_errors() {
        let err = |extra: &str| {
            Config::from_toml(&format!("{PROVIDERS}{extra}"))
                .unwrap_err()
                .to_string()
        };
        let e = err("[models.free]\nprovider = \"openai\"\noutput_usd_per_mtok = 1.0\n");
        assert!(e.contains("has no input_usd_per_mtok"), "{e}");
        let e = err(
            "[models.x]\nprovider = \"nope\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n",
        );
        assert!(
            e.contains("'nope', which is not a configured provider"),
            "{e}"
        );
        let e = err("[providers.gemini]\nkind = \"gemini\"\nbase_url = \"https://x\"\n");
        assert!(
            e.contains("providers.gemini") && e.contains("gemini"),
            "{e}"
        );
        let e = err(
            "[providers.typo]\nkind = \"openai\"\nbase_url = \"https://x\"\napi_key = \"sk\"\n",
        );
        assert!(e.contains("api_key"), "unknown keys are errors: {e}");
    }

    #[test]
    fn api_keys_come_from_the_environment_and_never_print() {
        let e = ApiKey::from_env("openai", "BIZQ_TEST_SURELY_UNSET_KEY").unwrap_err();
        assert!(
            e.to_string().contains("BIZQ_TEST_SURELY_UNSET_KEY"),
            "names the variable: {e}"
        );
        let key = ApiKey("sk-secret-value".into());
        assert_eq!(format!("{key:?}"), "***");
        assert_eq!(key.expose(), "sk-secret-value");
    }

    #[test]
    fn per_type_attempts_override_the_default() {
        let c = Config::from_toml("[worker.max_attempts]\n\"ai.generate\" = 5\n").unwrap();
        assert_eq!(c.worker.max_attempts_for("ai.generate"), 5);
        assert_eq!(c.worker.max_attempts_for("other"), 3);
    }
}
