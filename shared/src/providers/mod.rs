//! AI providers: the [`Provider`] trait the handlers call, the registry of configured
//! providers and models, and [`Providers::route`], which picks provider, model and prices.

pub mod anthropic;
pub mod errors;
pub mod limiter;
pub mod mock;
pub mod openai;
pub mod pricing;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use uuid::Uuid;

pub use errors::{TaskError, TaskErrorKind};
pub use pricing::{Prices, Usage};

use crate::config::{ApiKey, Config, ModelConfig, ProviderConfig, ProviderKind, Tier};
use crate::{Error, Result, metrics};

/// One text-generation call.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub task_id: Uuid,
    pub attempt: i32,
    pub prompt: String,
    /// The model name sent to the provider (`[models].upstream`), if any.
    pub upstream: Option<String>,
    pub max_tokens: Option<u32>,
}

/// What a provider answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    /// The model the provider says answered.
    pub model: Option<String>,
    pub usage: Usage,
    /// `finish_reason` / `stop_reason` as sent.
    pub finish_reason: Option<String>,
    /// The answer was cut at `max_tokens` (`length` / `max_tokens`): it completes, flagged.
    pub truncated: bool,
    pub request_id: Option<Box<str>>,
    /// The response headers (rate-limit figures lower the fleet's budgets).
    pub headers: HeaderMap,
}

/// A text-generation backend.
pub trait Provider: Send + Sync {
    /// The configured name (`[providers.<name>]`), stored in `tasks.ai_provider`.
    fn name(&self) -> &str;
    fn kind(&self) -> ProviderKind;
    /// Exactly one HTTP attempt; retries are the queue's business.
    fn generate<'a>(
        &'a self,
        request: &'a GenerateRequest,
    ) -> BoxFuture<'a, Result<Answer, TaskError>>;
}

/// The first `max_chars` characters of a provider's body, with anything that looks like a
/// credential masked as `[redacted]`. The whole body is masked first and cut afterwards, so a
/// secret straddling the cut cannot survive as a fragment. Masked:
/// - the value of any sensitive key, quoted or not (`"api_key": "…"`, `"password": "…"`,
///   `token=…`, `Authorization: …`; see [`is_sensitive_key`]);
/// - the word after `Bearer`, `Basic`, `Token` or `Digest`;
/// - `sk-…`-style keys, JWTs (three dot-separated base64url parts), `key=`/`token=` pairs
///   inside a word, and any run of 24 or more key-like characters (letters, digits, `+ / = _ -`)
///   that is not a plain lowercase word.
pub fn redact(body: &str, max_chars: usize) -> String {
    let masked = mask_words(&mask_key_values(&mask_auth_schemes(body)));
    masked.chars().take(max_chars).collect()
}

const REDACTED: &str = "[redacted]";

/// Key names whose values are secrets (compared lowercase, with `-` read as `_`).
fn is_sensitive_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase().replace('-', "_");
    const EXACT: &[&str] = &[
        "key",
        "apikey",
        "api_key",
        "password",
        "passwd",
        "pwd",
        "pass",
        "secret",
        "token",
        "auth",
        "authorization",
        "credential",
        "credentials",
        "cookie",
        "set_cookie",
        "signature",
        "sig",
        "session",
    ];
    const SUFFIXES: &[&str] = &[
        "_key",
        "_token",
        "_secret",
        "password",
        "_pwd",
        "_credential",
        "_signature",
        "_auth",
        "apikey",
    ];
    EXACT.contains(&k.as_str()) || SUFFIXES.iter().any(|s| k.ends_with(s))
}

/// The word after an HTTP auth scheme (`Bearer xyz`, `Basic dXNlcjpwYXNz`).
fn mask_auth_schemes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut mask_next = false;
    while !rest.is_empty() {
        let ws = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..ws]);
        rest = &rest[ws..];
        if rest.is_empty() {
            break;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = &rest[..end];
        if mask_next {
            out.push_str(REDACTED);
            // Keep closing punctuation of a quoted header value.
            let keep: String = word
                .chars()
                .rev()
                .take_while(|c| matches!(c, '"' | '\'' | ',' | '}' | ']'))
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            out.push_str(&keep);
        } else {
            out.push_str(word);
        }
        let bare = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        mask_next = !mask_next
            && ["bearer", "basic", "token", "digest"]
                .iter()
                .any(|s| bare.eq_ignore_ascii_case(s));
        rest = &rest[end..];
    }
    out
}

/// `key: value` and `key=value` pairs whose key is sensitive, in JSON, headers and query
/// strings: the value (up to its closing quote, or the next separator) becomes `[redacted]`.
fn mask_key_values(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if !is_key_char(chars[i]) || (i > 0 && is_key_char(chars[i - 1])) {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // A key candidate starts here.
        let start = i;
        while i < chars.len() && is_key_char(chars[i]) {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        out.push_str(&key);
        // Optional closing quote (maybe escaped, inside a JSON string), spaces, ':' or '='.
        let mut j = i;
        if j + 1 < chars.len() && chars[j] == '\\' && matches!(chars[j + 1], '"' | '\'') {
            j += 1;
        }
        if j < chars.len() && matches!(chars[j], '"' | '\'') {
            j += 1;
        }
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        if j >= chars.len() || !matches!(chars[j], ':' | '=') || !is_sensitive_key(&key) {
            continue;
        }
        j += 1;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        if j >= chars.len() || matches!(chars[j], '{' | '[') {
            continue;
        }
        out.extend(&chars[i..j]);
        let escaped = chars[j] == '\\' && j + 1 < chars.len() && matches!(chars[j + 1], '"' | '\'');
        if escaped || matches!(chars[j], '"' | '\'') {
            // Quoted value: up to the matching quote (`\"` inside a JSON string).
            let open = if escaped { j + 1 } else { j };
            let quote = chars[open];
            let mut k = open + 1;
            while k < chars.len() {
                if escaped && chars[k] == '\\' && k + 1 < chars.len() && chars[k + 1] == quote {
                    break;
                }
                if !escaped && chars[k] == quote {
                    break;
                }
                if !escaped && chars[k] == '\\' {
                    k += 1;
                }
                k += 1;
            }
            out.extend(&chars[j..=open]);
            out.push_str(REDACTED);
            i = k.min(chars.len());
        } else {
            let mut k = j;
            while k < chars.len()
                && !chars[k].is_whitespace()
                && !matches!(chars[k], ',' | '&' | ';' | '}' | ']')
            {
                k += 1;
            }
            if k > j {
                out.push_str(REDACTED);
            }
            i = k;
        }
    }
    out
}

/// Word by word: anything shaped like a key or token.
fn mask_words(text: &str) -> String {
    let is_sep = |c: char| {
        c.is_whitespace()
            || matches!(
                c,
                '"' | '\''
                    | '`'
                    | ','
                    | ';'
                    | ':'
                    | '('
                    | ')'
                    | '{'
                    | '}'
                    | '['
                    | ']'
                    | '<'
                    | '>'
                    | '&'
                    | '?'
            )
    };
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.is_empty() {
            return;
        }
        let core = word.trim_end_matches(['.', '!']);
        if core != REDACTED && looks_secret(core) {
            out.push_str(REDACTED);
            out.push_str(&word[core.len()..]);
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if is_sep(c) {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn looks_secret(word: &str) -> bool {
    let lower = word.to_ascii_lowercase();
    let keyish = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '_' | '-');
    let base64url = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '='))
    };
    let parts: Vec<&str> = word.split('.').collect();
    [
        "sk-", "sk_", "pk_", "rk_", "ghp_", "gho_", "xoxb-", "xoxp-", "akia",
    ]
    .iter()
    .any(|p| lower.starts_with(p) && word.len() > p.len() + 3)
        || [
            "key=",
            "token=",
            "secret=",
            "password=",
            "sig=",
            "signature=",
        ]
        .iter()
        .any(|p| lower.contains(p))
        || (parts.len() == 3 && word.len() >= 16 && parts.iter().all(|p| base64url(p)))
        || (word.chars().count() >= 24
            && word.chars().all(keyish)
            && !word.chars().all(|c| c.is_ascii_lowercase()))
}

/// The largest response body read from a provider; a longer one fails the call.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The HTTP side shared by the real providers: a client with the provider's timeout, the
/// endpoint URL with its query, and the auth header (marked sensitive, so `Debug` hides it).
pub(crate) struct Endpoint {
    pub name: String,
    pub client: reqwest::Client,
    pub url: reqwest::Url,
    pub headers: HeaderMap,
}

impl Endpoint {
    pub fn new(
        name: &str,
        config: &ProviderConfig,
        path: &str,
        default_auth_header: &str,
        key: Option<&ApiKey>,
    ) -> Result<Self> {
        let bad = |what: String| Error::Config(format!("providers.{name}: {what}"));
        let base = config.base_url.trim_end_matches('/');
        let mut url = reqwest::Url::parse(&format!("{base}{path}"))
            .map_err(|e| bad(format!("base_url is not a URL ({e})")))?;
        if !config.query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in &config.query {
                q.append_pair(k, v);
            }
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(key) = key {
            let header_name = config
                .auth_header
                .as_deref()
                .unwrap_or(default_auth_header)
                .to_ascii_lowercase();
            let name_h = HeaderName::from_bytes(header_name.as_bytes())
                .map_err(|_| bad(format!("auth_header '{header_name}' is not a header name")))?;
            let value = if header_name == "authorization" {
                format!("Bearer {}", key.expose())
            } else {
                key.expose().to_string()
            };
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| bad("the API key contains characters a header cannot carry".into()))?;
            value.set_sensitive(true);
            headers.insert(name_h, value);
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_seconds))
            .connect_timeout(Duration::from_secs(config.timeout_seconds.min(10)))
            .build()
            .map_err(|e| bad(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            name: name.to_string(),
            client,
            url,
            headers,
        })
    }

    /// POSTs `body` once. A 2xx answer's body comes back (at most [`MAX_BODY_BYTES`]); any
    /// other answer or a transport failure is classified into a [`TaskError`].
    pub async fn post(&self, body: &Value) -> Result<(HeaderMap, Vec<u8>), TaskError> {
        let bytes = serde_json::to_vec(body).map_err(|e| {
            TaskError::permanent("bad_request", format!("cannot encode the request: {e}"))
        })?;
        let mut resp = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .body(bytes)
            .send()
            .await
            .map_err(|e| errors::transport(&self.name, &e))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut buf = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > MAX_BODY_BYTES {
                        return Err(TaskError::permanent(
                            "response_too_large",
                            format!("{} sent a response over {MAX_BODY_BYTES} bytes", self.name),
                        ));
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(errors::transport(&self.name, &e)),
            }
        }
        if (200..300).contains(&status) {
            Ok((headers, buf))
        } else {
            Err(errors::classify(
                &self.name,
                status,
                &headers,
                &String::from_utf8_lossy(&buf),
                Utc::now(),
            ))
        }
    }

    /// A 2xx body that does not parse: the provider answered, so retrying would pay twice.
    pub fn malformed(&self, headers: &HeaderMap, e: &serde_json::Error) -> TaskError {
        TaskError {
            request_id: errors::request_id(headers),
            ..TaskError::permanent(
                "bad_response",
                format!(
                    "{} sent a response that is not what its API documents: {e}",
                    self.name
                ),
            )
        }
    }
}

/// Where a call goes: the provider, the model (its `[models]` name and the name sent), and
/// the prices it is charged at (`None` only for the mock without a `[models]` entry).
#[derive(Clone)]
pub struct Route {
    pub provider: Arc<dyn Provider>,
    pub model: String,
    pub upstream: Option<String>,
    pub prices: Option<Prices>,
    /// The model's default `max_tokens`.
    pub max_tokens: Option<u32>,
    /// Under `auto` routing: the best model of each other provider of the same tier, in the
    /// order routing prefers them, for when this route's provider is out of budget
    /// ([`Providers::call_routed`]). Empty for pinned tasks.
    pub fallbacks: Vec<Route>,
}

/// The model name of the mock when no `[models]` entry applies.
pub const MOCK_MODEL: &str = "mock-1";

/// How one call on one route ended, for [`Providers::call_routed`].
enum Attempt {
    /// The budget did not let the call go; nothing was sent.
    Refused(TaskError),
    /// The call was made (or could not be made for another reason than the budget).
    Failed(TaskError),
}

/// Of two refusals, the one the task should act on: a snooze (a budget refills) over a
/// permanent refusal (a call too large for that provider), and of two snoozes the earlier.
fn earlier_refusal(a: TaskError, b: TaskError) -> TaskError {
    match (&a.kind, &b.kind) {
        (TaskErrorKind::Snooze { until: ua, .. }, TaskErrorKind::Snooze { until: ub, .. }) => {
            if ub < ua { b } else { a }
        }
        (TaskErrorKind::Snooze { .. }, _) => a,
        (_, TaskErrorKind::Snooze { .. }) => b,
        _ => a,
    }
}

/// A workspace's `ai_preferences`, as far as routing reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct Preferences {
    pub preferred_provider: Option<String>,
    pub quality_tier: Option<Tier>,
    /// 0 (price does not matter: the dearest model of the tier) … 1 (the cheapest).
    pub cost_sensitivity: f64,
    pub max_task_cost: Option<f64>,
}

impl Default for Preferences {
    fn default() -> Self {
        Self {
            preferred_provider: None,
            quality_tier: None,
            cost_sensitivity: 0.5,
            max_task_cost: None,
        }
    }
}

impl Preferences {
    /// Reads the JSON column leniently: a missing or malformed key means "no preference".
    pub fn from_json(v: Option<&Value>) -> Self {
        let Some(v) = v else {
            return Self::default();
        };
        Self {
            preferred_provider: v["preferred_provider"]
                .as_str()
                .filter(|s| !s.is_empty() && *s != "auto")
                .map(String::from),
            quality_tier: v["quality_tier"].as_str().and_then(Tier::parse),
            cost_sensitivity: v["cost_sensitivity"]
                .as_f64()
                .unwrap_or(0.5)
                .clamp(0.0, 1.0),
            max_task_cost: v["max_task_cost"].as_f64(),
        }
    }
}

/// What routing needs to know about a task.
#[derive(Debug, Clone)]
pub struct RouteRequest<'a> {
    pub ai_provider: Option<&'a str>,
    pub ai_model: Option<&'a str>,
    pub preferences: &'a Preferences,
    pub prompt_chars: usize,
    pub max_tokens: Option<u32>,
}

/// The providers enabled by config, their models and prices, and which providers are parked.
#[derive(Clone)]
pub struct Providers {
    by_name: BTreeMap<String, Arc<dyn Provider>>,
    models: BTreeMap<String, ModelConfig>,
    default: String,
    credits_per_usd: u64,
    /// Providers parked fleet-wide, until when (refreshed by the worker from `provider_status`).
    parked: Arc<RwLock<HashMap<String, DateTime<Utc>>>>,
    /// The fleet-wide rate budgets (a worker's; `None` for routing only).
    budgets: Option<limiter::Budgets>,
    /// Each real provider's budget limits and call timeout.
    limits: BTreeMap<String, (limiter::Limits, Duration)>,
}

/// How long a call may wait in process for its turn in the rate budget; beyond it the task
/// snoozes (no attempt used) until the budget refills.
pub const BUDGET_MAX_WAIT: Duration = Duration::from_secs(2);
/// How long a call waits in process for a `max_in_flight` slot before its task snoozes.
pub const IN_FLIGHT_PATIENCE: Duration = Duration::from_secs(10);

/// `max_tokens` sent to Anthropic when neither the task nor the model names one.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

impl Providers {
    /// Builds every enabled provider, reading API keys from the environment. Missing keys are
    /// configuration errors naming the variable (never a value).
    pub fn from_config(config: &Config) -> Result<Self> {
        Self::build(config, true)
    }

    /// The same registry without API keys, for routing and estimates only (the scheduler):
    /// its providers are never called.
    pub fn for_routing(config: &Config) -> Result<Self> {
        Self::build(config, false)
    }

    fn build(config: &Config, read_keys: bool) -> Result<Self> {
        let mut by_name: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
        if config.providers.mock.enabled {
            by_name.insert(
                "mock".into(),
                Arc::new(mock::MockProvider::new(config.providers.mock.clone())),
            );
        }
        for (name, p) in &config.providers.endpoints {
            let key = match &p.api_key_env {
                Some(var) if read_keys => Some(ApiKey::from_env(name, var)?),
                _ => None,
            };
            let provider: Arc<dyn Provider> = match p.kind {
                ProviderKind::OpenAi => Arc::new(openai::OpenAi::new(name, p, key.as_ref())?),
                ProviderKind::Anthropic => {
                    Arc::new(anthropic::Anthropic::new(name, p, key.as_ref())?)
                }
                ProviderKind::Mock => {
                    return Err(Error::Config(format!(
                        "providers.{name}: kind mock is only for [providers.mock]"
                    )));
                }
            };
            by_name.insert(name.clone(), provider);
        }
        let limits = config
            .providers
            .endpoints
            .iter()
            .map(|(name, p)| {
                let limits = limiter::Limits {
                    rpm: p.rpm,
                    input_tpm: p.input_tpm,
                    output_tpm: p.output_tpm,
                    max_in_flight: p.max_in_flight.map(|n| n.min(u64::from(u32::MAX)) as u32),
                };
                (
                    name.clone(),
                    (limits, Duration::from_secs(p.timeout_seconds)),
                )
            })
            .collect();
        Ok(Self {
            by_name,
            models: config.models.clone(),
            default: config.providers.default.clone(),
            credits_per_usd: config.billing.credits_per_usd,
            parked: Arc::default(),
            budgets: None,
            limits,
        })
    }

    /// Calls go through the fleet-wide rate budgets in `budgets`.
    pub fn with_budgets(mut self, budgets: limiter::Budgets) -> Self {
        self.budgets = Some(budgets);
        self
    }

    /// Writes every real provider's limits to the shared budgets (worker start-up; several
    /// workers at once are fine).
    pub async fn configure_budgets(&self) -> Result<()> {
        if let Some(budgets) = &self.budgets {
            for (name, (limits, _)) in &self.limits {
                budgets.configure(name, limits).await?;
            }
        }
        Ok(())
    }

    /// One call through the fleet-wide rate budget of its provider: take (requests, the
    /// prompt's estimated tokens, `max_tokens` of output, a `max_in_flight` slot) before the
    /// call, waiting in process only briefly; out of budget, the task snoozes until the budget
    /// refills (no attempt used). After the call: the response's rate-limit headers lower the
    /// budget, usage settles the take (unused output comes back), a 429 blocks the provider
    /// fleet-wide until its reset. The mock and routing-only registries call directly.
    pub async fn call(
        &self,
        route: &Route,
        request: &GenerateRequest,
    ) -> Result<Answer, TaskError> {
        match self.try_call(route, request).await {
            Ok(answer) => Ok(answer),
            Err(Attempt::Refused(e) | Attempt::Failed(e)) => Err(e),
        }
    }

    /// [`call`](Self::call) on `route`, and when its provider is out of budget (a bucket
    /// refuses the take, it is blocked after a 429, or every `max_in_flight` slot stays busy)
    /// on each of `route.fallbacks` in turn: other providers of the same tier that `auto`
    /// routing would also accept (pinned tasks have none). Only when every one refuses does
    /// the task snooze, until the earliest of their budgets is ready. Returns the route that
    /// answered, for pricing. `task_max_tokens` is the task's own `max_tokens`; a fallback
    /// otherwise sends its model's default.
    pub async fn call_routed(
        &self,
        route: Route,
        request: &GenerateRequest,
        task_max_tokens: Option<u32>,
    ) -> Result<(Route, Answer), TaskError> {
        let first = route.provider.name().to_string();
        let mut fallbacks = route.fallbacks.clone().into_iter();
        let mut refusal: Option<TaskError> = None;
        let mut current = route;
        let mut req = std::borrow::Cow::Borrowed(request);
        loop {
            match self.try_call(&current, &req).await {
                Ok(answer) => {
                    let to = current.provider.name();
                    if to != first {
                        metrics::provider_rerouted(&first, to);
                    }
                    return Ok((current, answer));
                }
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Refused(e)) => {
                    refusal = Some(match refusal {
                        None => e,
                        Some(prev) => earlier_refusal(prev, e),
                    });
                }
            }
            let Some(next) = fallbacks.find(|r| !self.is_parked(r.provider.name())) else {
                return Err(refusal.unwrap_or_else(|| {
                    TaskError::retryable("rate_budget", "no provider had budget for the call")
                }));
            };
            req = std::borrow::Cow::Owned(GenerateRequest {
                upstream: next.upstream.clone(),
                max_tokens: task_max_tokens.or(next.max_tokens),
                ..request.clone()
            });
            current = next;
        }
    }

    /// One call on `route`: the budget's refusal (nothing was sent) is told apart from the
    /// call's own failure, so [`call_routed`](Self::call_routed) can try another provider.
    async fn try_call(&self, route: &Route, request: &GenerateRequest) -> Result<Answer, Attempt> {
        let name = route.provider.name();
        let (Some(budgets), Some((_, timeout))) = (&self.budgets, self.limits.get(name)) else {
            return self.generate(route, request).await.map_err(Attempt::Failed);
        };
        let ask = limiter::Ask {
            input_tokens: (request.prompt.chars().count() as u64).div_ceil(4),
            max_output_tokens: u64::from(request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
            max_wait: BUDGET_MAX_WAIT,
            hold_for: *timeout + Duration::from_secs(10),
        };
        let started = std::time::Instant::now();
        let refused = |until: DateTime<Utc>, reason: &'static str, message: String| {
            metrics::provider_budget_refused(name, reason);
            Attempt::Refused(TaskError {
                kind: TaskErrorKind::Snooze { until, reason },
                ..TaskError::permanent("rate_limited", message)
            })
        };
        let permit = loop {
            let e = match budgets.take(name, &ask).await {
                Ok(p) => break p,
                Err(e) => e,
            };
            match &e {
                limiter::TakeError::Wait {
                    reason: limiter::WaitReason::InFlight,
                    until,
                    after,
                    ..
                } => {
                    if started.elapsed() + *after > IN_FLIGHT_PATIENCE {
                        return Err(refused(*until, "max_in_flight", e.to_string()));
                    }
                    tokio::time::sleep(*after).await;
                }
                limiter::TakeError::Wait { until, reason, .. } => {
                    let reason = match reason {
                        limiter::WaitReason::Blocked => "rate_limited",
                        _ => "rate_budget",
                    };
                    return Err(refused(*until, reason, e.to_string()));
                }
                limiter::TakeError::TooLarge { .. } => {
                    metrics::provider_budget_refused(name, "too_large");
                    return Err(Attempt::Refused(TaskError::permanent(
                        "over_rate_budget",
                        e.to_string(),
                    )));
                }
                limiter::TakeError::Database(db) => {
                    return Err(Attempt::Failed(TaskError::retryable(
                        "database_error",
                        format!("taking from {name}'s rate budget failed: {db}"),
                    )));
                }
            }
        };
        tokio::time::sleep(permit.delay).await;
        let result = self.generate(route, request).await;
        let settled = match &result {
            Ok(answer) => {
                if let Err(e) = budgets
                    .observe_headers(name, |h| answer.headers.get(h)?.to_str().ok())
                    .await
                {
                    tracing::warn!(provider = name, error = %e, "cannot lower the budget from the response headers");
                }
                let u = &answer.usage;
                permit
                    .settle(
                        budgets,
                        u.input_tokens + u.cache_write_tokens,
                        u.output_tokens,
                    )
                    .await
            }
            Err(e) => {
                if let TaskErrorKind::Snooze { until, .. } = &e.kind
                    && e.http_status == Some(429)
                    && let Err(err) = budgets.block_until(name, *until).await
                {
                    tracing::warn!(provider = name, error = %err, "cannot block the provider's budget after a 429");
                }
                if e.code == "connect_error" {
                    permit.give_back(budgets).await
                } else {
                    permit.settle_unknown(budgets).await
                }
            }
        };
        if let Err(e) = settled {
            tracing::warn!(provider = name, error = %e, "cannot settle the rate budget; its slot expires on its own");
        }
        result.map_err(Attempt::Failed)
    }

    /// The provider's one HTTP attempt, recorded in the provider metrics (calls, latency,
    /// errors by code, tokens and the credits the answer is priced at).
    async fn generate(
        &self,
        route: &Route,
        request: &GenerateRequest,
    ) -> Result<Answer, TaskError> {
        let started = std::time::Instant::now();
        let result = route.provider.generate(request).await;
        if metrics::enabled() {
            let provider = route.provider.name();
            let model = if self.models.contains_key(&route.model) || route.model == MOCK_MODEL {
                route.model.as_str()
            } else {
                "other"
            };
            match &result {
                Ok(answer) => {
                    let credits = match &route.prices {
                        Some(prices) => {
                            pricing::cost(
                                route.provider.kind(),
                                &answer.usage,
                                prices,
                                self.credits_per_usd,
                            )
                            .credits
                        }
                        None => {
                            mock::mock_cost(answer.usage.input_tokens, answer.usage.output_tokens)
                        }
                    };
                    metrics::provider_answered(
                        provider,
                        model,
                        started.elapsed(),
                        &answer.usage,
                        credits,
                    );
                }
                Err(e) => metrics::provider_failed(provider, model, started.elapsed(), e),
            }
        }
        result
    }

    pub fn credits_per_usd(&self) -> u64 {
        self.credits_per_usd
    }

    /// Whether any provider other than the mock is configured (the worker then keeps the
    /// parked list fresh).
    pub fn has_real_providers(&self) -> bool {
        self.by_name.keys().any(|n| n != "mock")
    }

    /// Replaces the parked list (from `provider_status`).
    pub fn set_parked(&self, parked: HashMap<String, DateTime<Utc>>) {
        if let Ok(mut p) = self.parked.write() {
            *p = parked;
        }
    }

    /// Marks one provider parked right away (this worker saw it fail).
    pub fn park(&self, provider: &str, until: DateTime<Utc>) {
        if let Ok(mut p) = self.parked.write() {
            p.insert(provider.to_string(), until);
        }
    }

    pub fn is_parked(&self, provider: &str) -> bool {
        self.parked
            .read()
            .ok()
            .and_then(|p| p.get(provider).copied())
            .is_some_and(|until| until > Utc::now())
    }

    fn provider(&self, name: &str) -> Result<Arc<dyn Provider>, TaskError> {
        self.by_name.get(name).cloned().ok_or_else(|| {
            let enabled: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
            TaskError::permanent(
                "unknown_provider",
                format!(
                    "provider '{name}' is not enabled on this worker (enabled: {})",
                    if enabled.is_empty() {
                        "none".to_string()
                    } else {
                        enabled.join(", ")
                    }
                ),
            )
        })
    }

    fn route_to_model(&self, name: &str, m: &ModelConfig) -> Result<Route, TaskError> {
        Ok(Route {
            provider: self.provider(&m.provider)?,
            model: name.to_string(),
            upstream: Some(m.upstream.clone().unwrap_or_else(|| name.to_string())),
            prices: Some(prices_of(m)),
            max_tokens: m.max_tokens,
            fallbacks: Vec::new(),
        })
    }

    /// The estimated credits of a call on `m` (see [`pricing::estimate`]).
    fn estimate_on(&self, m: &ModelConfig, req: &RouteRequest<'_>) -> i32 {
        let max_tokens = req
            .max_tokens
            .or(m.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        pricing::estimate(
            req.prompt_chars,
            u64::from(max_tokens),
            &prices_of(m),
            self.credits_per_usd,
        )
    }

    /// Picks provider, model and prices for a task:
    /// 1. `ai_model` pins the model (and so its provider); a model without a `[models]` entry
    ///    fails the task, except on the mock (pinned, or a fleet without `[models]`), which
    ///    answers for any name.
    /// 2. `ai_provider` (not `auto`) pins the provider; its model is chosen as in 3.
    /// 3. Otherwise the workspace's `preferred_provider` (if configured), else every provider:
    ///    the models of the workspace's `quality_tier` (all models if none is of that tier)
    ///    whose estimate fits `max_task_cost` (all, if none fits), the cheapest first when
    ///    `cost_sensitivity` ≥ 0.5, else the dearest. Under `auto`, models of parked
    ///    providers are skipped while another remains.
    /// 4. No models at all: the default provider (the mock) with no model.
    pub fn route(&self, req: &RouteRequest<'_>) -> Result<Route, TaskError> {
        let pinned_provider = req.ai_provider.filter(|p| !p.is_empty() && *p != "auto");
        if let Some(model) = req.ai_model.filter(|m| !m.is_empty()) {
            return match self.models.get(model) {
                Some(m) => {
                    if let Some(p) = pinned_provider
                        && p != m.provider
                    {
                        return Err(TaskError::permanent(
                            "unknown_model",
                            format!(
                                "model '{model}' is served by provider '{}', but the task pins provider '{p}'",
                                m.provider
                            ),
                        ));
                    }
                    self.route_to_model(model, m)
                }
                // The mock answers for any model name when the task pins it, or when the
                // fleet has no `[models]` at all (demos, benchmarks); a fleet that prices
                // models never runs an unpriced one.
                None if pinned_provider == Some("mock")
                    || (pinned_provider.is_none()
                        && self.models.is_empty()
                        && self.default == "mock") =>
                {
                    Ok(Route {
                        provider: self.provider("mock")?,
                        model: model.to_string(),
                        upstream: Some(model.to_string()),
                        prices: None,
                        max_tokens: None,
                        fallbacks: Vec::new(),
                    })
                }
                None => Err(TaskError::permanent(
                    "unknown_model",
                    format!(
                        "unknown model '{model}': it has no [models.\"{model}\"] entry (configured: {})",
                        if self.models.is_empty() {
                            "none".to_string()
                        } else {
                            self.models.keys().cloned().collect::<Vec<_>>().join(", ")
                        }
                    ),
                )),
            };
        }
        let (providers, auto): (Option<&str>, bool) = match pinned_provider {
            Some(p) => (Some(p), false),
            None => match req.preferences.preferred_provider.as_deref() {
                Some(p) if self.by_name.contains_key(p) => (Some(p), false),
                _ => (None, true),
            },
        };
        let mut candidates: Vec<(&String, &ModelConfig)> = self
            .models
            .iter()
            .filter(|(_, m)| providers.is_none_or(|p| m.provider == p))
            .filter(|(_, m)| self.by_name.contains_key(&m.provider))
            .collect();
        if candidates.is_empty() {
            let name = providers.unwrap_or(&self.default);
            let provider = self.provider(name)?;
            if provider.kind() != ProviderKind::Mock {
                return Err(TaskError::permanent(
                    "unknown_model",
                    format!("provider '{name}' has no [models] entry to run this task with"),
                ));
            }
            return Ok(Route {
                provider,
                model: MOCK_MODEL.into(),
                upstream: None,
                prices: None,
                max_tokens: None,
                fallbacks: Vec::new(),
            });
        }
        let keep_if_any = |c: &mut Vec<(&String, &ModelConfig)>,
                           f: &dyn Fn(&ModelConfig) -> bool| {
            if c.iter().any(|(_, m)| f(m)) {
                c.retain(|(_, m)| f(m));
            }
        };
        if let Some(tier) = req.preferences.quality_tier {
            keep_if_any(&mut candidates, &|m| m.tier == tier);
        }
        if auto {
            keep_if_any(&mut candidates, &|m| !self.is_parked(&m.provider));
        }
        if let Some(max) = req.preferences.max_task_cost {
            keep_if_any(&mut candidates, &|m| {
                f64::from(self.estimate_on(m, req)) <= max
            });
        }
        candidates.sort_by_key(|(name, m)| {
            let p = prices_of(m);
            (p.input + p.output, (*name).clone())
        });
        if req.preferences.cost_sensitivity < 0.5 {
            candidates.reverse();
        }
        let (name, m) = candidates[0];
        let mut route = self.route_to_model(name, m)?;
        if auto {
            // Fallbacks for an out-of-budget provider: the preferred model of each other
            // provider of the chosen tier that is not parked, in the same order.
            let mut seen = vec![m.provider.as_str()];
            for (other, om) in &candidates[1..] {
                if om.tier != m.tier
                    || seen.contains(&om.provider.as_str())
                    || self.is_parked(&om.provider)
                {
                    continue;
                }
                seen.push(om.provider.as_str());
                route.fallbacks.push(self.route_to_model(other, om)?);
            }
        }
        Ok(route)
    }

    /// Estimated credits of an `ai.generate` task, for admission: its route's prices, the
    /// prompt at 4 characters a token and `max_tokens` of output. `None` when the route has
    /// no prices (the mock) or cannot be found.
    pub fn estimate(&self, req: &RouteRequest<'_>) -> Option<i32> {
        let route = self.route(req).ok()?;
        let prices = route.prices?;
        let max_tokens = req
            .max_tokens
            .or(route.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        Some(pricing::estimate(
            req.prompt_chars,
            u64::from(max_tokens),
            &prices,
            self.credits_per_usd,
        ))
    }
}

fn prices_of(m: &ModelConfig) -> Prices {
    let input = m.input_usd_per_mtok.unwrap_or(0.0);
    Prices::from_usd_per_mtok(
        input,
        m.cached_input_usd_per_mtok.unwrap_or(input),
        m.output_usd_per_mtok.unwrap_or(0.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_lose_anything_like_a_key() {
        let body = r#"{"error": "invalid key sk-abc123def456", "auth": "Bearer xyz", "url": "/v1?api_key=s3cret"}"#;
        let r = redact(body, 500);
        assert!(!r.contains("sk-abc123def456"), "{r}");
        assert!(!r.contains("xyz"), "{r}");
        assert!(!r.contains("s3cret"), "{r}");
        assert!(r.contains("invalid key"), "{r}");
        assert!(r.contains("\"error\""), "{r}");
        assert_eq!(redact("abcdef", 3), "abc");
    }
}
