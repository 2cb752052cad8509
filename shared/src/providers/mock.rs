//! The built-in `mock` provider: deterministic text, token counts from the prompt's length,
//! configurable latency, failure rate, and markers that make a prompt fail for good (400) or
//! be rate limited once (429 with `retry-after-ms`). Enabled only by config. Its failures go
//! through the same classification table as the real providers' answers.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderValue};
use uuid::Uuid;

use super::{Answer, GenerateRequest, Provider, TaskError, Usage, errors};
use crate::config::{MockProviderConfig, ProviderKind};

pub struct MockProvider {
    config: MockProviderConfig,
    /// Tasks already rate limited once by this process (a snooze does not use an attempt,
    /// so the attempt number cannot tell).
    rate_limited: Mutex<HashSet<Uuid>>,
}

impl MockProvider {
    pub fn new(config: MockProviderConfig) -> Self {
        Self {
            config,
            rate_limited: Mutex::default(),
        }
    }

    fn error(status: u16, headers: &HeaderMap, body: &str) -> TaskError {
        errors::classify("mock", status, headers, body, Utc::now())
    }

    /// Deterministic in (task, attempt): the same attempt always fails or succeeds alike, and
    /// a task's attempts fail independently of each other, each with `failure_rate`.
    fn fails_transiently(&self, request: &GenerateRequest) -> bool {
        if self.config.failure_rate <= 0.0 {
            return false;
        }
        // FNV-1a alone moves its value by a near-constant step when only the last byte (the
        // attempt) changes, so a task's attempts were far from independent (at a 30% rate, not
        // one task in 20,000 failed three in a row: retries could never run out). The
        // finalizer spreads that byte over every bit.
        let h = fmix64(fnv1a(
            format!("{}:{}", request.task_id, request.attempt).as_bytes(),
        ));
        (h % 1_000_000) as f64 / 1_000_000.0 < self.config.failure_rate
    }
}

/// Credits per call: one, plus one per started thousand tokens beyond the first.
pub fn mock_cost(prompt_tokens: u64, completion_tokens: u64) -> i32 {
    (1 + (prompt_tokens + completion_tokens) / 1000).min(i32::MAX as u64) as i32
}

impl Provider for MockProvider {
    fn name(&self) -> &str {
        "mock"
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Mock
    }

    fn generate<'a>(
        &'a self,
        request: &'a GenerateRequest,
    ) -> BoxFuture<'a, Result<Answer, TaskError>> {
        Box::pin(async move {
            if self.config.latency_ms > 0 {
                tokio::time::sleep(Duration::from_millis(self.config.latency_ms)).await;
            }
            if let Some(marker) = &self.config.permanent_failure_marker
                && request.prompt.contains(marker.as_str())
            {
                return Err(Self::error(
                    400,
                    &HeaderMap::new(),
                    r#"{"error":"the prompt was rejected by the mock provider"}"#,
                ));
            }
            if let Some(marker) = &self.config.rate_limit_marker
                && request.prompt.contains(marker.as_str())
                && self
                    .rate_limited
                    .lock()
                    .map(|mut s| s.insert(request.task_id))
                    .unwrap_or(false)
            {
                let mut headers = HeaderMap::new();
                if let Ok(v) =
                    HeaderValue::from_str(&self.config.rate_limit_retry_after_ms.to_string())
                {
                    headers.insert("retry-after-ms", v);
                }
                return Err(Self::error(
                    429,
                    &headers,
                    r#"{"error":"mock rate limit: slow down"}"#,
                ));
            }
            if self.fails_transiently(request) {
                return Err(Self::error(
                    503,
                    &HeaderMap::new(),
                    r#"{"error":"mock provider overloaded"}"#,
                ));
            }
            let prompt_tokens = (request.prompt.chars().count() as u64).div_ceil(4).max(1);
            let completion_tokens =
                (16 + prompt_tokens / 2).min(u64::from(request.max_tokens.unwrap_or(256)));
            let preview: String = request.prompt.chars().take(60).collect();
            let text = format!(
                "[mock:{:08x}] A considered answer to \"{preview}\".",
                fnv1a(request.prompt.as_bytes()) as u32
            );
            Ok(Answer {
                text,
                model: Some(request.upstream.clone().unwrap_or_else(|| "mock-1".into())),
                usage: Usage {
                    input_tokens: prompt_tokens,
                    output_tokens: completion_tokens,
                    ..Usage::default()
                },
                finish_reason: Some("stop".into()),
                truncated: false,
                request_id: None,
                headers: HeaderMap::new(),
            })
        })
    }
}

/// MurmurHash3's 64-bit finalizer: every input bit affects every output bit.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    /// Transient failures are independent across a task's attempts: at a 30% rate, about
    /// 0.3³ = 2.7% of tasks fail three attempts in a row (a retry budget can run out), and
    /// each attempt alone fails about 30% of the time.
    #[test]
    fn attempts_fail_independently_at_the_configured_rate() {
        let mock = MockProvider::new(MockProviderConfig {
            failure_rate: 0.3,
            ..Default::default()
        });
        let fails = |task_id: Uuid, attempt: i32| {
            mock.fails_transiently(&GenerateRequest {
                task_id,
                attempt,
                prompt: "p".into(),
                upstream: None,
                max_tokens: None,
            })
        };
        let n = 20_000;
        let (mut first, mut all_three) = (0, 0);
        for i in 0..n {
            let id = Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000 + i);
            first += fails(id, 1) as u32;
            all_three += (fails(id, 1) && fails(id, 2) && fails(id, 3)) as u32;
            assert_eq!(fails(id, 2), fails(id, 2), "deterministic");
        }
        assert!(
            (5_400..6_600).contains(&first),
            "attempt 1 failed {first} of {n}"
        );
        assert!(
            (400..700).contains(&all_three),
            "all three attempts failed for {all_three} of {n} (expected about 540)"
        );
    }
}
