//! The typed parts of a `tasks` row that Rust reads and writes: its status and the shape of
//! its `error_details`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// `tasks.status`: a `text` column with a CHECK over exactly these values (migration 0001), so
/// the enum encodes and decodes as `text` and binds where SQL compares with the column.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, sqlx::Type, Serialize, Deserialize,
)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Pending,
    Queued,
    Processing,
    Completed,
    Failed,
    Cancelled,
    Escalated,
}

impl TaskStatus {
    /// Every status, in the order a task travels (the CHECK's order).
    pub const ALL: [TaskStatus; 7] = [
        Self::Pending,
        Self::Queued,
        Self::Processing,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::Escalated,
    ];

    /// The value stored in `tasks.status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Escalated => "escalated",
        }
    }

    /// Completed, failed or cancelled: the engine never moves the task again on its own.
    /// (`escalated` waits for a person, who may retry it.)
    pub const fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so `{:<10}` lines up in tables.
        f.pad(self.as_str())
    }
}

/// An unknown status name (from a flag, a form or a URL).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "unknown status '{0}' (one of: pending, queued, processing, completed, failed, cancelled, escalated)"
)]
pub struct UnknownStatus(pub String);

impl FromStr for TaskStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// So that `assert_eq!(lifecycle::cancel(..).await?, "queued")` reads as before.
impl PartialEq<&str> for TaskStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for TaskStatus {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

/// `tasks.error_details`, as the engine writes it from Rust: always `message`, `code` and
/// `attempt`; the rest where it applies. (The SQL-built details — reclaim's `lease_expired`,
/// a set-aside task's `*_error`, an admin's cancel — have the same three keys.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetails {
    /// For people.
    pub message: String,
    /// Machine-readable, e.g. `bad_input`, `rate_limited`, `dependency_failed`.
    pub code: String,
    /// The attempt that failed (0: the task was never run).
    pub attempt: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// A provider's answer: its status, a redacted excerpt of its body, its request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_excerpt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// How long until the next try (retry, snooze).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// Why a snoozed task waits (e.g. `rate_limited`, `rate_budget`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When a snoozed task is due again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// The provider a parked task waits for (`unpark_providers` reads this key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_until: Option<DateTime<Utc>>,
    /// Admission: the dependency the verdict is about, and its status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency_status: Option<TaskStatus>,
    /// Admission: the engine limit that was hit (`bizq_limits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i32>,
    /// Admission: the estimate that exceeded the workspace's `max_task_cost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<i32>,
}

impl ErrorDetails {
    pub fn new(code: impl Into<String>, message: impl Into<String>, attempt: i32) -> Self {
        Self {
            message: message.into(),
            code: code.into(),
            attempt,
            ..Self::default()
        }
    }

    /// The JSON written to `error_details`.
    pub fn to_json(&self) -> Value {
        // A struct of strings, numbers, uuids and timestamps always serializes.
        serde_json::to_value(self).unwrap_or_else(|e| {
            serde_json::json!({"message": self.message, "code": self.code,
                               "attempt": self.attempt, "encoding_error": e.to_string()})
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!("done".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn error_details_keep_the_three_keys_and_drop_empty_ones() {
        let mut d = ErrorDetails::new("bad_input", "no prompt", 1);
        d.http_status = Some(400);
        assert_eq!(
            d.to_json(),
            serde_json::json!({"message": "no prompt", "code": "bad_input", "attempt": 1,
                               "http_status": 400})
        );
    }
}
