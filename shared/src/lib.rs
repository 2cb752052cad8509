//! BizQ engine: a multi-tenant task queue on PostgreSQL.
//!
//! Product code inserts rows into `tasks`; a fleet of schedulers and workers carries each one
//! to a terminal state. The crate is laid out the way a task travels:
//!
//! - [`db`]: connecting, and the embedded schema migrations.
//! - [`task`]: the typed parts of a task row ([`TaskStatus`], [`ErrorDetails`]).
//! - [`lifecycle`]: every status change of a task, each one named function beside its SQL.
//! - [`scheduler`]: admits new tasks, promotes due ones, reclaims expired leases, housekeeping.
//! - [`worker`]: claims tasks, runs handlers, heartbeats leases, writes results in batches.
//! - [`handlers`]: what each task type does and what input it needs.
//! - [`task_types`]: the types workers register, so an insert can queue its own task.
//! - [`providers`]: the AI providers behind the handlers (a built-in `mock` for now).
//! - [`retry`]: how long a failed attempt (or a failed database call) waits before the next.
//! - [`listen`]: LISTEN/NOTIFY wake-ups that reconnect on their own.
//! - [`config`]: the settings every binary reads.
//! - [`registry`], [`metrics`], [`health`], [`ops`], [`logs`]: the ops surface (live workers,
//!   Prometheus metrics, health endpoints, log format).
//! - [`queries`]: the admin commands' reads of `tasks`.

pub mod config;
pub mod db;
pub mod error;
pub mod fleet;
pub mod handlers;
pub mod health;
pub mod housekeeping;
pub mod lifecycle;
pub mod listen;
pub mod logs;
pub mod metrics;
pub mod ops;
pub mod providers;
pub mod queries;
pub mod registry;
pub mod retry;
pub mod scheduler;
pub mod task;
pub mod task_types;
pub mod worker;

pub use config::Config;
pub use error::{Error, Result};
pub use task::{ErrorDetails, TaskStatus};
pub mod signals;
