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

/// The first `max_chars` characters of a provider's body with anything that looks like a
/// credential masked: `sk-…` keys, `key=…` pairs, the token after `Bearer`, and any long
/// unbroken run of key-like characters.
pub fn redact(body: &str, max_chars: usize) -> String {
    let excerpt: String = body.chars().take(max_chars).collect();
    let is_sep =
        |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ':' | '{' | '}' | '[' | ']');
    let mut out = String::with_capacity(excerpt.len());
    let mut word = String::new();
    let mut after_bearer = false;
    let flush = |word: &mut String, out: &mut String, after_bearer: &mut bool| {
        if word.is_empty() {
            return;
        }
        let lower = word.to_ascii_lowercase();
        let secret = *after_bearer
            || lower.starts_with("sk-")
            || lower.starts_with("sk_")
            || lower.contains("key=")
            || lower.contains("token=")
            || (word.len() >= 32
                && word
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        *after_bearer = lower == "bearer";
        out.push_str(if secret { "[redacted]" } else { word.as_str() });
        word.clear();
    };
    for c in excerpt.chars() {
        if is_sep(c) {
            flush(&mut word, &mut out, &mut after_bearer);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out, &mut after_bearer);
    out
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
