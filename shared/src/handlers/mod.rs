//! Task types: the [`Handler`] trait (a type's input, its validation, its run) and the
//! [`Handlers`] registry that maps a task type to its handler.
//!
//! A handler parses its task's `input` into its own input struct ([`Handler::parse`]: the
//! validation, also run without running the task) and runs one attempt ([`Handler::run`])
//! with the task ([`TaskContext`]) and what it may use ([`HandlerContext`]: the providers
//! and the pool, for handlers that write business rows). It answers with the output and its
//! cost ([`HandlerOutput`]) or a [`TaskError`] saying what the worker does next (retry,
//! fail, snooze, park the provider).
//!
//! Adding a type is one `impl Handler` and one line in [`Handlers::builtin`]: the scheduler
//! admits the type, workers register it in `task_types` (their `--types` patterns pick which)
//! and run it; nothing else matches on type names.

mod generate;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

pub use generate::{Generate, GenerateInput, parse_generate};

use crate::providers::{Preferences, Providers};
/// Why an attempt failed; the same shape whether the handler or the provider said so.
pub use crate::providers::{TaskError, TaskErrorKind};

/// `error_details.code` of a task that waited because its provider was already parked (no
/// call was made).
pub const PROVIDER_PARKED: &str = "provider_parked";

/// The task types of [`Handlers::builtin`], in order (a unit test keeps the two equal).
pub const KNOWN_TYPES: &[&str] = &[generate::TASK_TYPE];

/// The parts of a claimed task a handler sees.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub attempt: i32,
    pub task_type: String,
    pub input: Value,
    pub ai_provider: Option<String>,
    pub ai_model: Option<String>,
    /// The workspace's `ai_preferences`.
    pub preferences: Preferences,
}

/// What a handler may use besides its task: the AI providers (routing, rate budgets,
/// prices) and the database, for handlers whose result is a business row (a blog post, a
/// product description). A handler that writes rows does so outside the engine's result
/// transaction, keyed by the task id, so a retried attempt finds its own earlier write.
#[derive(Clone)]
pub struct HandlerContext {
    pub providers: Providers,
    pub pool: PgPool,
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

/// What admission knows of a task when it estimates its cost.
#[derive(Debug, Clone, Copy)]
pub struct EstimateRequest<'a> {
    pub ai_provider: Option<&'a str>,
    pub ai_model: Option<&'a str>,
    pub preferences: &'a Preferences,
}

/// One task type.
pub trait Handler: Send + Sync + 'static {
    /// The input once checked.
    type Input: Send + 'static;

    /// The `tasks.type` it runs, e.g. `ai.generate`.
    fn task_type(&self) -> &'static str;

    /// Reads and checks a task's `input`. An error here fails the task at once (`bad_input`).
    fn parse(&self, input: &Value) -> Result<Self::Input, TaskError>;

    /// Runs one attempt. Called outside any database transaction; the worker aborts the
    /// future when the task is cancelled or its lease is lost.
    fn run(
        &self,
        input: Self::Input,
        task: &TaskContext,
        cx: &HandlerContext,
    ) -> impl Future<Output = Result<HandlerOutput, TaskError>> + Send;

    /// The credits a task will cost, for admission to fill in `estimated_cost` when product
    /// code left it empty (so the claim's reservation and `max_task_cost` work on real
    /// numbers). `None`: no estimate (the default).
    fn estimate(
        &self,
        input: &Self::Input,
        req: &EstimateRequest<'_>,
        providers: &Providers,
    ) -> Option<i32> {
        let _ = (input, req, providers);
        None
    }
}

/// A [`Handler`] with its input type erased, so handlers of any input share one registry.
trait DynHandler: Send + Sync {
    fn validate(&self, input: &Value) -> Result<(), TaskError>;
    fn run<'a>(
        &'a self,
        task: &'a TaskContext,
        cx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<HandlerOutput, TaskError>>;
    fn estimate(
        &self,
        input: &Value,
        req: &EstimateRequest<'_>,
        providers: &Providers,
    ) -> Option<i32>;
}

impl<H: Handler> DynHandler for H {
    fn validate(&self, input: &Value) -> Result<(), TaskError> {
        self.parse(input).map(|_| ())
    }

    fn run<'a>(
        &'a self,
        task: &'a TaskContext,
        cx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<HandlerOutput, TaskError>> {
        match self.parse(&task.input) {
            Ok(input) => Handler::run(self, input, task, cx).boxed(),
            Err(e) => futures::future::ready(Err(e)).boxed(),
        }
    }

    fn estimate(
        &self,
        input: &Value,
        req: &EstimateRequest<'_>,
        providers: &Providers,
    ) -> Option<i32> {
        let input = self.parse(input).ok()?;
        Handler::estimate(self, &input, req, providers)
    }
}

/// The registry: task type → handler.
#[derive(Clone, Default)]
pub struct Handlers {
    by_type: BTreeMap<&'static str, Arc<dyn DynHandler>>,
    /// Registration order (what `types` lists).
    order: Vec<&'static str>,
}

impl Handlers {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The handlers of this version of BizQ.
    pub fn builtin() -> Self {
        Self::new().with(Generate)
    }

    /// The built-in registry, built once (admission and validation read it).
    pub fn shared() -> &'static Handlers {
        static BUILTIN: OnceLock<Handlers> = OnceLock::new();
        BUILTIN.get_or_init(Handlers::builtin)
    }

    /// Adds (or replaces) the handler of `handler.task_type()`.
    pub fn with<H: Handler>(mut self, handler: H) -> Self {
        let t = handler.task_type();
        if self.by_type.insert(t, Arc::new(handler)).is_none() {
            self.order.push(t);
        }
        self
    }

    /// The task types registered, in registration order.
    pub fn types(&self) -> Vec<&'static str> {
        self.order.clone()
    }

    pub fn contains(&self, task_type: &str) -> bool {
        self.by_type.contains_key(task_type)
    }

    /// Checks a task's input without running it.
    pub fn validate(&self, task_type: &str, input: &Value) -> Result<(), TaskError> {
        match self.by_type.get(task_type) {
            Some(h) => h.validate(input),
            None => Err(self.unknown_type(task_type)),
        }
    }

    /// Runs one attempt of `task` with its type's handler.
    pub async fn run(
        &self,
        task: &TaskContext,
        cx: &HandlerContext,
    ) -> Result<HandlerOutput, TaskError> {
        match self.by_type.get(task.task_type.as_str()) {
            Some(h) => h.run(task, cx).await,
            None => Err(self.unknown_type(&task.task_type)),
        }
    }

    /// The estimate of a task's cost, where its handler gives one and its input is valid.
    pub fn estimate(
        &self,
        task_type: &str,
        input: &Value,
        req: &EstimateRequest<'_>,
        providers: &Providers,
    ) -> Option<i32> {
        self.by_type.get(task_type)?.estimate(input, req, providers)
    }

    pub fn unknown_type(&self, task_type: &str) -> TaskError {
        TaskError::permanent(
            "unknown_task_type",
            format!(
                "unknown task type '{task_type}' (known: {})",
                self.order.join(", ")
            ),
        )
    }
}

/// Checks a task's input against the built-in handlers without running it.
pub fn validate_input(task_type: &str, input: &Value) -> Result<(), TaskError> {
    Handlers::shared().validate(task_type, input)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn known_types_are_the_builtin_registry() {
        assert_eq!(Handlers::builtin().types(), KNOWN_TYPES);
    }

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

    /// A second type with its own input struct registers beside `ai.generate` and is
    /// dispatched by type, validated by its own rules.
    #[test]
    fn a_registered_type_is_validated_by_its_own_handler() {
        struct Echo;
        impl Handler for Echo {
            type Input = String;
            fn task_type(&self) -> &'static str {
                "test.echo"
            }
            fn parse(&self, input: &Value) -> Result<String, TaskError> {
                input["say"]
                    .as_str()
                    .map(String::from)
                    .ok_or_else(|| TaskError::permanent("bad_input", "no \"say\""))
            }
            async fn run(
                &self,
                input: String,
                _task: &TaskContext,
                _cx: &HandlerContext,
            ) -> Result<HandlerOutput, TaskError> {
                Ok(HandlerOutput {
                    output: json!({ "said": input }),
                    cost: 1,
                    cost_breakdown: json!({}),
                    provider: None,
                    model: None,
                })
            }
        }
        let h = Handlers::builtin().with(Echo);
        assert_eq!(h.types(), ["ai.generate", "test.echo"]);
        assert!(h.validate("test.echo", &json!({"say": "hi"})).is_ok());
        assert_eq!(
            h.validate("test.echo", &json!({"prompt": "hi"}))
                .unwrap_err()
                .code,
            "bad_input"
        );
        assert!(h.validate("ai.generate", &json!({"prompt": "hi"})).is_ok());
        let e = h.validate("video.render", &json!({})).unwrap_err();
        assert_eq!(
            e.message,
            "unknown task type 'video.render' (known: ai.generate, test.echo)"
        );
    }
}
