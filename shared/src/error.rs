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
    /// A trigger on an engine table would run a function that is not the engine's (migration
    /// 0017's `bizq_untrusted_triggers`): the engine refuses to write that table.
    #[error(
        "refusing to write {table}: {triggers} (a trigger whose function neither the table's \
         owner nor a superuser owns runs its code with the engine's rights; drop it)"
    )]
    UntrustedTriggers { table: String, triggers: String },
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
