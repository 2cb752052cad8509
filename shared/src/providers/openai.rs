//! OpenAI Chat Completions (`POST {base}/chat/completions`), and every server speaking it:
//! Azure OpenAI (`auth_header = "api-key"`, `query`), vLLM, Ollama, LiteLLM.

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Answer, Endpoint, GenerateRequest, Provider, TaskError, Usage, errors};
use crate::Result;
use crate::config::{ApiKey, ProviderConfig, ProviderKind};

pub struct OpenAi {
    endpoint: Endpoint,
    max_tokens_field: String,
}

impl OpenAi {
    pub fn new(name: &str, config: &ProviderConfig, key: Option<&ApiKey>) -> Result<Self> {
        Ok(Self {
            endpoint: Endpoint::new(name, config, "/chat/completions", "authorization", key)?,
            max_tokens_field: config.max_tokens_field.clone(),
        })
    }

    /// The request body: one user message, the upstream model, the length limit if any.
    pub fn body(&self, request: &GenerateRequest) -> Value {
        let mut body = json!({
            "model": request.upstream,
            "messages": [{"role": "user", "content": request.prompt}],
        });
        if let Some(n) = request.max_tokens {
            body[self.max_tokens_field.as_str()] = json!(n);
        }
        body
    }
}

#[derive(Deserialize)]
struct Completion {
    model: Option<String>,
    choices: Vec<Choice>,
    usage: Option<CompletionUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct CompletionUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

impl Provider for OpenAi {
    fn name(&self) -> &str {
        &self.endpoint.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::OpenAi
    }

    fn generate<'a>(
        &'a self,
        request: &'a GenerateRequest,
    ) -> BoxFuture<'a, Result<Answer, TaskError>> {
        Box::pin(async move {
            let (headers, bytes) = self.endpoint.post(&self.body(request)).await?;
            let c: Completion = serde_json::from_slice(&bytes)
                .map_err(|e| self.endpoint.malformed(&headers, &e))?;
            let request_id = errors::request_id(&headers);
            let Some(choice) = c.choices.into_iter().next() else {
                return Err(TaskError {
                    request_id,
                    ..TaskError::permanent(
                        "bad_response",
                        format!("{} answered with no choices", self.name()),
                    )
                });
            };
            let Some(usage) = c.usage else {
                // Never charge an unknown amount as zero.
                return Err(TaskError {
                    request_id,
                    ..TaskError::permanent(
                        "bad_response",
                        format!("{} answered without usage", self.name()),
                    )
                });
            };
            let text = match (choice.message.content, choice.message.refusal) {
                (Some(t), _) => t,
                (None, Some(r)) => {
                    return Err(TaskError {
                        request_id,
                        ..TaskError::permanent(
                            "refused",
                            format!("the model refused: {}", super::redact(&r, 300)),
                        )
                    });
                }
                (None, None) => String::new(),
            };
            Ok(Answer {
                text,
                model: c.model,
                usage: Usage {
                    input_tokens: usage.prompt_tokens,
                    output_tokens: usage.completion_tokens,
                    cached_input_tokens: usage
                        .prompt_tokens_details
                        .and_then(|d| d.cached_tokens)
                        .unwrap_or(0),
                    cache_write_tokens: 0,
                },
                truncated: choice.finish_reason.as_deref() == Some("length"),
                finish_reason: choice.finish_reason,
                request_id,
                headers,
            })
        })
    }
}
