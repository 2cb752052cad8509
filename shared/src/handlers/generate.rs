//! `ai.generate`: one prompt to the routed AI model; the answer's text is the output and its
//! token usage, priced, the cost.

use serde_json::{Value, json};

use super::{
    EstimateRequest, Handler, HandlerContext, HandlerOutput, PROVIDER_PARKED, TaskContext,
    TaskError,
};
use crate::config::ProviderKind;
use crate::providers::mock::mock_cost;
use crate::providers::pricing::{self, Breakdown};
use crate::providers::{GenerateRequest, Providers, RouteRequest};

/// Its `tasks.type`.
pub const TASK_TYPE: &str = "ai.generate";

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

/// The `ai.generate` handler.
pub struct Generate;

impl Handler for Generate {
    type Input = GenerateInput;

    fn task_type(&self) -> &'static str {
        TASK_TYPE
    }

    fn parse(&self, input: &Value) -> Result<GenerateInput, TaskError> {
        parse_generate(input)
    }

    /// The routed model's prices × (prompt characters / 4 input tokens + `max_tokens`
    /// output tokens); `None` for the unpriced mock.
    fn estimate(
        &self,
        input: &GenerateInput,
        req: &EstimateRequest<'_>,
        providers: &Providers,
    ) -> Option<i32> {
        providers.estimate(&RouteRequest {
            ai_provider: req.ai_provider,
            ai_model: req.ai_model,
            preferences: req.preferences,
            prompt_chars: input.prompt.chars().count(),
            max_tokens: input.max_tokens,
        })
    }

    async fn run(
        &self,
        input: GenerateInput,
        task: &TaskContext,
        cx: &HandlerContext,
    ) -> Result<HandlerOutput, TaskError> {
        let providers = &cx.providers;
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
        // Under `auto`, an out-of-budget provider gives way to another of the same tier.
        let (route, answer) = providers
            .call_routed(route, &request, input.max_tokens)
            .await?;
        let name = route.provider.name().to_string();
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
}
