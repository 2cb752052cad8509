//! AI providers: the [`Provider`] trait the handlers call, its error type, and the registry
//! that picks a provider for a task. Real OpenAI/Anthropic clients implement the same trait.

pub mod mock;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use uuid::Uuid;

use crate::config::ProvidersConfig;

/// One text-generation call.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub task_id: Uuid,
    pub attempt: i32,
    pub prompt: String,
    /// The task's `ai_model`, when it names one.
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
}

/// What a provider answered, with what it cost.
#[derive(Debug, Clone)]
pub struct GenerateResponse {
    pub text: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Credits charged to the workspace for this call.
    pub cost_credits: i32,
    /// How the cost was computed, stored in `tasks.cost_breakdown`.
    pub cost_breakdown: Value,
}

/// Whether another attempt can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Timeout, 5xx, 429, connection reset: retried with backoff.
    Transient,
    /// Bad input, 4xx other than 429: the task fails at once.
    Permanent,
}

/// A failed provider call. Built only from status codes and response bodies, never from
/// request headers, so it cannot carry an API key; [`redact`] scrubs bodies anyway.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: ErrorKind,
    /// Machine-readable code, e.g. `rate_limited`, `provider_unavailable`, `bad_request`.
    pub code: String,
    /// For people.
    pub message: String,
    pub http_status: Option<u16>,
    pub body_excerpt: Option<String>,
    /// A 429's `Retry-After`; wins over the computed backoff.
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn permanent(code: &str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            code: code.into(),
            message: message.into(),
            http_status: None,
            body_excerpt: None,
            retry_after: None,
        }
    }

    pub fn transient(code: &str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Transient,
            ..Self::permanent(code, message)
        }
    }

    /// Classifies an HTTP error answer: 429 and 5xx are transient, other 4xx permanent.
    pub fn from_http(
        provider: &str,
        status: u16,
        body: &str,
        retry_after: Option<Duration>,
    ) -> Self {
        let (kind, code) = match status {
            429 => (ErrorKind::Transient, "rate_limited"),
            408 => (ErrorKind::Transient, "provider_timeout"),
            500..=599 => (ErrorKind::Transient, "provider_unavailable"),
            401 | 403 => (ErrorKind::Permanent, "provider_auth"),
            _ => (ErrorKind::Permanent, "bad_request"),
        };
        Self {
            kind,
            code: code.into(),
            message: format!("{provider} answered HTTP {status}"),
            http_status: Some(status),
            body_excerpt: Some(redact(body, 500)),
            retry_after,
        }
    }
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

/// A text-generation backend.
pub trait Provider: Send + Sync {
    /// The name stored in `tasks.ai_provider`.
    fn name(&self) -> &'static str;
    fn generate<'a>(
        &'a self,
        request: &'a GenerateRequest,
    ) -> BoxFuture<'a, Result<GenerateResponse, ProviderError>>;
}

/// The providers enabled by config, and which one serves a task.
#[derive(Clone)]
pub struct Providers {
    by_name: BTreeMap<&'static str, Arc<dyn Provider>>,
    default: String,
}

impl Providers {
    pub fn from_config(config: &ProvidersConfig) -> Self {
        let mut by_name: BTreeMap<&'static str, Arc<dyn Provider>> = BTreeMap::new();
        if config.mock.enabled {
            let mock = mock::MockProvider::new(config.mock.clone());
            by_name.insert(mock.name(), Arc::new(mock));
        }
        Self {
            by_name,
            default: config.default.clone(),
        }
    }

    /// The provider a task asked for (`ai_provider`), or the default for NULL/`auto`.
    pub fn select(&self, requested: Option<&str>) -> Result<Arc<dyn Provider>, ProviderError> {
        let name = match requested {
            None | Some("") | Some("auto") => self.default.as_str(),
            Some(n) => n,
        };
        self.by_name.get(name).cloned().ok_or_else(|| {
            let enabled: Vec<&str> = self.by_name.keys().copied().collect();
            ProviderError::permanent(
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_errors_are_classified() {
        assert_eq!(
            ProviderError::from_http("x", 429, "", None).kind,
            ErrorKind::Transient
        );
        assert_eq!(
            ProviderError::from_http("x", 503, "", None).kind,
            ErrorKind::Transient
        );
        assert_eq!(
            ProviderError::from_http("x", 400, "", None).kind,
            ErrorKind::Permanent
        );
        assert_eq!(
            ProviderError::from_http("x", 401, "", None).code,
            "provider_auth"
        );
    }

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
