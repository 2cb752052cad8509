//! Task types: which exist, what input each needs, and what running one does.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::config::ProviderKind;
use crate::providers::mock::mock_cost;
use crate::providers::pricing::{self, Breakdown};
use crate::providers::{GenerateRequest, Preferences, Providers, RouteRequest};

/// Why an attempt failed; the same shape whether the handler or the provider said so.
pub use crate::providers::{TaskError, TaskErrorKind};

/// `error_details.code` of a task that waited because its provider was already parked (no
/// call was made).
pub const PROVIDER_PARKED: &str = "provider_parked";

/// Every task type this version of BizQ can run. The scheduler rejects other types at
/// admission, so an unknown type fails with a clear error instead of waiting forever.
pub const KNOWN_TYPES: &[&str] = &["ai.generate"];

/// The parts of a claimed task a handler sees.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub id: Uuid,
    pub attempt: i32,
    pub task_type: String,
    pub input: Value,
    pub ai_provider: Option<String>,
    pub ai_model: Option<String>,
    /// The workspace's `ai_preferences`.
    pub preferences: Preferences,
}

/// A successful run: what goes into `output`, `actual_cost`, `cost_breakdown`, `ai_provider`
/// and `ai_model`.
#[derive(Debug, Clone)]
pub struct HandlerOutput {
    pub output: Value,
    pub cost: i32,
    pub cost_breakdown: Value,
    pub provider: Option<String>,
    pub model: Option<String>,
}

/// Input of `ai.generate`.
pub struct GenerateInput {
    pub prompt: String,
    pub max_tokens: Option<u32>,
}

/// Reads and checks an `ai.generate` input.
pub fn parse_generate(input: &Value) -> Result<GenerateInput, TaskError> {
    let bad = |msg: &str| {
        TaskError::permanent(
            "bad_input",
            format!(
                "ai.generate input {msg}; expected {{\"prompt\": \"...\", \"max_tokens\"?: n}}"
            ),
        )
    };
    let obj = input
        .as_object()
        .ok_or_else(|| bad("is not a JSON object"))?;
    let prompt = match obj.get("prompt") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(bad("has an empty \"prompt\"")),
        Some(_) => return Err(bad("has a \"prompt\" that is not a string")),
        None => return Err(bad("has no \"prompt\"")),
    };
    let max_tokens = match obj.get("max_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=1_000_000).contains(&n) => Some(n as u32),
            _ => return Err(bad("has a \"max_tokens\" that is not a positive integer")),
        },
    };
    Ok(GenerateInput { prompt, max_tokens })
}

/// Checks a task's input without running it.
pub fn validate_input(task_type: &str, input: &Value) -> Result<(), TaskError> {
    match task_type {
        "ai.generate" => parse_generate(input).map(|_| ()),
        other => Err(unknown_type(other)),
    }
}

pub fn unknown_type(task_type: &str) -> TaskError {
    TaskError::permanent(
        "unknown_task_type",
        format!(
            "unknown task type '{task_type}' (known: {})",
            KNOWN_TYPES.join(", ")
        ),
    )
}

/// Runs one attempt of a task. Called outside any database transaction.
pub async fn run(providers: &Providers, task: &TaskContext) -> Result<HandlerOutput, TaskError> {
    match task.task_type.as_str() {
        "ai.generate" => {
            let input = parse_generate(&task.input)?;
            let route = providers.route(&RouteRequest {
                ai_provider: task.ai_provider.as_deref(),
                ai_model: task.ai_model.as_deref(),
                preferences: &task.preferences,
                prompt_chars: input.prompt.chars().count(),
                max_tokens: input.max_tokens,
            })?;
            let name = route.provider.name().to_string();
            if providers.is_parked(&name) {
                return Err(TaskError::provider_unavailable(
                    &name,
                    PROVIDER_PARKED,
                    format!(
                        "provider '{name}' is parked after an authentication or quota failure; waiting for it"
                    ),
                ));
            }
            let request = GenerateRequest {
                task_id: task.id,
                attempt: task.attempt,
                prompt: input.prompt,
                upstream: route.upstream.clone(),
                max_tokens: input.max_tokens.or(route.max_tokens),
            };
            let answer = providers.call(&route, &request).await?;
            let usage = answer.usage;
            let (cost, breakdown) = match &route.prices {
                Some(prices) => {
                    let cost = pricing::cost(
                        route.provider.kind(),
                        &usage,
                        prices,
                        providers.credits_per_usd(),
                    );
                    let breakdown = Breakdown {
                        provider: &name,
                        model: &route.model,
                        upstream: route.upstream.as_deref().unwrap_or(&route.model),
                        usage: &usage,
                        prices,
                        credits_per_usd: providers.credits_per_usd(),
                        cost: &cost,
                        request_id: answer.request_id.as_deref(),
                        truncated: answer.truncated,
                        finish_reason: answer.finish_reason.as_deref(),
                    }
                    .to_json();
                    (cost.credits, breakdown)
                }
                None => {
                    debug_assert_eq!(route.provider.kind(), ProviderKind::Mock);
                    let credits = mock_cost(usage.input_tokens, usage.output_tokens);
                    (
                        credits,
                        json!({
                            "provider": name,
                            "model": route.model,
                            "prompt_tokens": usage.input_tokens,
                            "completion_tokens": usage.output_tokens,
                            "credits": credits,
                            "rule": "1 credit + 1 per 1000 tokens",
                        }),
                    )
                }
            };
            let mut output = json!({
                "text": answer.text,
                "usage": {
                    "prompt_tokens": usage.input_tokens,
                    "completion_tokens": usage.output_tokens,
                    "total_tokens": usage.input_tokens + usage.output_tokens,
                },
            });
            if answer.truncated {
                output["truncated"] = json!(true);
            }
            Ok(HandlerOutput {
                output,
                cost,
                cost_breakdown: breakdown,
                provider: Some(name),
                model: Some(route.model),
            })
        }
        other => Err(unknown_type(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_input_is_checked() {
        assert!(validate_input("ai.generate", &json!({"prompt": "hi"})).is_ok());
        for bad in [
            json!("hi"),
            json!({}),
            json!({"prompt": ""}),
            json!({"prompt": 3}),
            json!({"prompt": "x", "max_tokens": -1}),
        ] {
            let e = validate_input("ai.generate", &bad).unwrap_err();
            assert_eq!(e.code, "bad_input", "{bad}");
        }
        assert_eq!(
            validate_input("nope", &json!({})).unwrap_err().code,
            "unknown_task_type"
        );
    }
}
