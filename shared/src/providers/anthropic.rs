//! Anthropic Messages (`POST {base}/v1/messages`, `x-api-key`, `anthropic-version`).

use futures::future::BoxFuture;
use reqwest::header::HeaderValue;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Answer, DEFAULT_MAX_TOKENS, Endpoint, GenerateRequest, Provider, TaskError, Usage, errors,
};
use crate::Result;
use crate::config::{ApiKey, ProviderConfig, ProviderKind};

/// The API version this client speaks.
pub const API_VERSION: &str = "2023-06-01";

pub struct Anthropic {
    endpoint: Endpoint,
}

impl Anthropic {
    pub fn new(name: &str, config: &ProviderConfig, key: Option<&ApiKey>) -> Result<Self> {
        let mut endpoint = Endpoint::new(name, config, "/v1/messages", "x-api-key", key)?;
        endpoint
            .headers
            .insert("anthropic-version", HeaderValue::from_static(API_VERSION));
        Ok(Self { endpoint })
    }

    /// The request body; `max_tokens` is required by the API.
    pub fn body(&self, request: &GenerateRequest) -> Value {
        json!({
            "model": request.upstream,
            "max_tokens": request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            "messages": [{"role": "user", "content": request.prompt}],
        })
    }
}

#[derive(Deserialize)]
struct Message {
    model: Option<String>,
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: MessageUsage,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct MessageUsage {
    input_tokens: u64,
    output_tokens: u64,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl Provider for Anthropic {
    fn name(&self) -> &str {
        &self.endpoint.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn generate<'a>(
        &'a self,
        request: &'a GenerateRequest,
    ) -> BoxFuture<'a, Result<Answer, TaskError>> {
        Box::pin(async move {
            let (headers, bytes) = self.endpoint.post(&self.body(request)).await?;
            let m: Message = serde_json::from_slice(&bytes)
                .map_err(|e| self.endpoint.malformed(&headers, &e))?;
            let text: String = m
                .content
                .iter()
                .filter(|b| b.kind == "text")
                .filter_map(|b| b.text.as_deref())
                .collect();
            Ok(Answer {
                text,
                model: m.model,
                usage: Usage {
                    input_tokens: m.usage.input_tokens,
                    output_tokens: m.usage.output_tokens,
                    cached_input_tokens: m.usage.cache_read_input_tokens.unwrap_or(0),
                    cache_write_tokens: m.usage.cache_creation_input_tokens.unwrap_or(0),
                },
                truncated: m.stop_reason.as_deref() == Some("max_tokens"),
                finish_reason: m.stop_reason,
                request_id: errors::request_id(&headers),
                headers,
            })
        })
    }
}
