//! The one table that turns a provider's answer (status, headers, body) or a transport failure
//! into a [`TaskError`] the worker acts on: retry, fail, snooze, or park the provider.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;

use super::redact;

/// What the worker does with a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskErrorKind {
    /// Transient (timeout, 5xx, connection reset): another attempt after a backoff, or after
    /// `retry_after` when the provider said so. Uses an attempt.
    Retryable { retry_after: Option<Duration> },
    /// The task fails at once (bad input, a 4xx the provider will always answer).
    Permanent,
    /// Rate limited: the task waits until `until` WITHOUT using an attempt.
    Snooze {
        until: DateTime<Utc>,
        reason: &'static str,
    },
    /// The provider cannot serve anyone (bad key, exhausted account): the provider is parked
    /// fleet-wide and the task waits, without using an attempt, until it is probed again.
    ProviderUnavailable { provider: String },
}

/// A failed attempt. Built only from status codes, response headers and bodies (redacted),
/// never from request headers, so it cannot carry an API key.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    pub kind: TaskErrorKind,
    /// Machine-readable code, e.g. `rate_limited`, `provider_auth`, `bad_request`.
    pub code: &'static str,
    /// For people.
    pub message: String,
    pub http_status: Option<u16>,
    pub body_excerpt: Option<Box<str>>,
    /// The provider's request id, when it sent one.
    pub request_id: Option<Box<str>>,
}

impl TaskError {
    pub fn permanent(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: TaskErrorKind::Permanent,
            code,
            message: message.into(),
            http_status: None,
            body_excerpt: None,
            request_id: None,
        }
    }

    pub fn retryable(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: TaskErrorKind::Retryable { retry_after: None },
            ..Self::permanent(code, message)
        }
    }

    pub fn provider_unavailable(
        provider: &str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind: TaskErrorKind::ProviderUnavailable {
                provider: provider.into(),
            },
            ..Self::permanent(code, message)
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, TaskErrorKind::Retryable { .. })
    }
}

/// Longest body excerpt kept in `error_details`.
const EXCERPT_CHARS: usize = 500;
/// Wait after a 429 that names no time at all.
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(2);

/// **The classification table** (also in the README, "AI providers"):
///
/// | answer | kind | code |
/// |---|---|---|
/// | 401, 403 | ProviderUnavailable (park) | `provider_auth` |
/// | 402; 429 with `insufficient_quota` / `billing_error` | ProviderUnavailable (park) | `provider_quota` |
/// | 429 | Snooze until `retry-after-ms` / `retry-after` / reset headers | `rate_limited` |
/// | 408, 409, 5xx, 529 | Retryable (backoff, `retry-after` wins) | `provider_error` |
/// | other 4xx | Permanent, with the provider's redacted message | `bad_request` |
///
/// `x-should-retry: true` makes any answer but a park Retryable; `x-should-retry: false`
/// makes a Retryable or Snooze answer Permanent. Connect errors and timeouts are classified
/// by the HTTP clients ([`transport`]).
pub fn classify(
    provider: &str,
    status: u16,
    headers: &HeaderMap,
    body: &str,
    now: DateTime<Utc>,
) -> TaskError {
    let lower = body.to_ascii_lowercase();
    let quota = lower.contains("insufficient_quota") || lower.contains("billing_error");
    let should_retry = header(headers, "x-should-retry").map(|v| v.eq_ignore_ascii_case("true"));
    let wait = retry_after(headers, now);
    let (kind, code) = match status {
        401 | 403 => (
            TaskErrorKind::ProviderUnavailable {
                provider: provider.into(),
            },
            "provider_auth",
        ),
        402 => (
            TaskErrorKind::ProviderUnavailable {
                provider: provider.into(),
            },
            "provider_quota",
        ),
        429 if quota => (
            TaskErrorKind::ProviderUnavailable {
                provider: provider.into(),
            },
            "provider_quota",
        ),
        429 => (
            TaskErrorKind::Snooze {
                until: now
                    + chrono::Duration::from_std(wait.unwrap_or(DEFAULT_RATE_LIMIT_WAIT))
                        .unwrap_or_default(),
                reason: "rate_limited",
            },
            "rate_limited",
        ),
        408 | 409 | 500..=599 => (
            TaskErrorKind::Retryable { retry_after: wait },
            "provider_error",
        ),
        _ => (TaskErrorKind::Permanent, "bad_request"),
    };
    let kind = match (should_retry, kind) {
        (_, k @ TaskErrorKind::ProviderUnavailable { .. }) => k,
        (Some(true), TaskErrorKind::Permanent) => TaskErrorKind::Retryable { retry_after: wait },
        (Some(false), TaskErrorKind::Retryable { .. } | TaskErrorKind::Snooze { .. }) => {
            TaskErrorKind::Permanent
        }
        (_, k) => k,
    };
    let detail = provider_message(body)
        .map(|m| format!(": {}", redact(&m, 300)))
        .unwrap_or_default();
    TaskError {
        kind,
        code,
        message: format!("{provider} answered HTTP {status}{detail}"),
        http_status: Some(status),
        body_excerpt: Some(redact(body, EXCERPT_CHARS).into_boxed_str()),
        request_id: request_id(headers),
    }
}

/// A transport failure (no HTTP answer). Before the request was sent (connect, DNS, TLS) a
/// retry is safe; after it (timeout, reset) the provider may have done and billed the work,
/// so it is retried but recorded as `outcome_unknown`.
pub fn transport(provider: &str, error: &reqwest::Error) -> TaskError {
    if error.is_connect() {
        TaskError::retryable(
            "connect_error",
            format!("cannot connect to {provider}: {}", describe(error)),
        )
    } else if error.is_timeout() {
        TaskError::retryable(
            "outcome_unknown",
            format!(
                "{provider} did not answer in time (the request was sent; it may have been billed)"
            ),
        )
    } else {
        TaskError::retryable(
            "outcome_unknown",
            format!(
                "the connection to {provider} failed after the request was sent: {}",
                describe(error)
            ),
        )
    }
}

/// A reqwest error without its URL (the URL may carry a query with a key in it).
fn describe(error: &reqwest::Error) -> String {
    let mut e: &dyn std::error::Error = error;
    let mut parts = Vec::new();
    while let Some(source) = e.source() {
        parts.push(source.to_string());
        e = source;
    }
    redact(&parts.join(": "), 300)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// `x-request-id` (OpenAI and compatibles) or `request-id` (Anthropic).
pub fn request_id(headers: &HeaderMap) -> Option<Box<str>> {
    header(headers, "x-request-id")
        .or_else(|| header(headers, "request-id"))
        .map(|s| s.chars().take(200).collect::<String>().into_boxed_str())
}

/// The `message` of an OpenAI (`{"error": {"message"}}`) or Anthropic
/// (`{"type": "error", "error": {"message"}}`) error body.
fn provider_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    match &v["error"] {
        serde_json::Value::String(s) => Some(s.clone()),
        e => e["message"].as_str().map(String::from),
    }
}

/// How long the provider asked us to wait: `retry-after-ms`, else `retry-after` (seconds or
/// an HTTP date), else the latest of the rate-limit reset headers (OpenAI's Go durations like
/// `6m0s`, Anthropic's RFC 3339 times).
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    if let Some(ms) = header(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_millis(ms.round() as u64));
    }
    if let Some(v) = header(headers, "retry-after") {
        if let Ok(secs) = v.parse::<f64>()
            && secs.is_finite()
            && secs >= 0.0
        {
            return Some(Duration::from_millis((secs * 1000.0).round() as u64));
        }
        if let Ok(at) = DateTime::parse_from_rfc2822(v) {
            return Some(until(now, at.with_timezone(&Utc)));
        }
    }
    let mut latest: Option<Duration> = None;
    for (name, value) in headers {
        let name = name.as_str();
        let Ok(value) = value.to_str() else { continue };
        let d = if name.starts_with("x-ratelimit-reset-") {
            go_duration(value.trim())
        } else if name.starts_with("anthropic-ratelimit-") && name.ends_with("-reset") {
            DateTime::parse_from_rfc3339(value.trim())
                .ok()
                .map(|at| until(now, at.with_timezone(&Utc)))
        } else {
            None
        };
        if let Some(d) = d {
            latest = Some(latest.map_or(d, |l| l.max(d)));
        }
    }
    latest
}

fn until(now: DateTime<Utc>, at: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or(Duration::ZERO)
}

/// A Go `time.Duration` string as OpenAI sends it: `12ms`, `1s`, `6m0s`, `1m30.5s`, `1h2m`.
pub fn go_duration(s: &str) -> Option<Duration> {
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += n * factor;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn kind(status: u16, h: &[(&str, &str)], body: &str) -> TaskErrorKind {
        classify("p", status, &headers(h), body, now()).kind
    }

    #[test]
    fn the_table() {
        let park = TaskErrorKind::ProviderUnavailable {
            provider: "p".into(),
        };
        assert_eq!(kind(401, &[], ""), park);
        assert_eq!(kind(403, &[], ""), park);
        assert_eq!(kind(402, &[], ""), park);
        assert_eq!(
            kind(429, &[], r#"{"error":{"code":"insufficient_quota"}}"#),
            park
        );
        for s in [408, 409, 500, 502, 503, 504, 529] {
            assert!(
                matches!(kind(s, &[], ""), TaskErrorKind::Retryable { .. }),
                "{s}"
            );
        }
        for s in [400, 404, 413, 422] {
            assert_eq!(kind(s, &[], ""), TaskErrorKind::Permanent, "{s}");
        }
        assert_eq!(
            kind(429, &[("retry-after-ms", "1500")], ""),
            TaskErrorKind::Snooze {
                until: now() + chrono::Duration::milliseconds(1500),
                reason: "rate_limited"
            }
        );
    }

    #[test]
    fn x_should_retry_wins() {
        assert!(matches!(
            kind(400, &[("x-should-retry", "true")], ""),
            TaskErrorKind::Retryable { .. }
        ));
        assert_eq!(
            kind(503, &[("x-should-retry", "false")], ""),
            TaskErrorKind::Permanent
        );
        assert!(matches!(
            kind(401, &[("x-should-retry", "true")], ""),
            TaskErrorKind::ProviderUnavailable { .. }
        ));
    }

    #[test]
    fn retry_after_sources_in_order() {
        let d = |h: &[(&str, &str)]| retry_after(&headers(h), now());
        assert_eq!(
            d(&[("retry-after-ms", "250"), ("retry-after", "9")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(d(&[("retry-after", "3")]), Some(Duration::from_secs(3)));
        assert_eq!(
            d(&[("retry-after", "Fri, 27 Nov 2026 10:00:07 GMT")]),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            d(&[
                ("x-ratelimit-reset-requests", "1m30.5s"),
                ("x-ratelimit-reset-tokens", "6m0s")
            ]),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            d(&[("anthropic-ratelimit-requests-reset", "2026-11-27T10:00:04Z")]),
            Some(Duration::from_secs(4))
        );
        assert_eq!(d(&[]), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("1m30.5s"), Some(Duration::from_millis(90_500)));
        assert_eq!(go_duration("abc"), None);
        assert_eq!(go_duration(""), None);
    }

    #[test]
    fn messages_are_the_providers_redacted() {
        let e = classify(
            "openai",
            400,
            &headers(&[("x-request-id", "req_1")]),
            r#"{"error":{"message":"bad key sk-abcdef123456 for model","type":"invalid_request_error"}}"#,
            now(),
        );
        assert!(e.message.contains("bad key"), "{}", e.message);
        assert!(!e.message.contains("sk-abcdef"), "{}", e.message);
        assert_eq!(e.request_id.as_deref(), Some("req_1"));
    }
}
