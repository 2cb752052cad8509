//! The library's error type.

/// Everything the engine can fail with. Messages never contain credentials or API keys.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("configuration error: {0}")]
    Config(String),
    /// The first connection failed; the message names host, port and database, not secrets.
    #[error("{0}")]
    Connect(String),
    #[error("task {0} not found")]
    TaskNotFound(uuid::Uuid),
    #[error("task {id} is {status}; {action} needs it to be one of: {expected}")]
    WrongStatus {
        id: uuid::Uuid,
        status: crate::TaskStatus,
        action: &'static str,
        expected: String,
    },
    #[error("invalid task: {0}")]
    InvalidTask(String),
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
