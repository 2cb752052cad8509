//! Task types: which exist, what input each needs, and what running one does.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::providers::{GenerateRequest, ProviderError, Providers};

/// Why an attempt failed; the same shape whether the handler or the provider said so.
pub type TaskError = ProviderError;

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
struct GenerateInput {
    prompt: String,
    max_tokens: Option<u32>,
}

fn parse_generate(input: &Value) -> Result<GenerateInput, TaskError> {
    let bad = |msg: &str| {
        ProviderError::permanent(
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
    ProviderError::permanent(
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
            let provider = providers.select(task.ai_provider.as_deref())?;
            let request = GenerateRequest {
                task_id: task.id,
                attempt: task.attempt,
                prompt: input.prompt,
                model: task.ai_model.clone(),
                max_tokens: input.max_tokens,
            };
            let answer = provider.generate(&request).await?;
            Ok(HandlerOutput {
                output: json!({
                    "text": answer.text,
                    "usage": {
                        "prompt_tokens": answer.prompt_tokens,
                        "completion_tokens": answer.completion_tokens,
                        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
                    },
                }),
                cost: answer.cost_credits,
                cost_breakdown: answer.cost_breakdown,
                provider: Some(provider.name().to_string()),
                model: Some(answer.model),
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
