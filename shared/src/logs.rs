//! Log output for the binaries: human-readable lines by default, one JSON object per line
//! with `--log-format json`; `RUST_LOG` filters either.

use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::config::LogFormat;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// Installs the global log subscriber. `default_filter` applies when `RUST_LOG` is unset. A
/// second call (several fleets in one test process) is a no-op.
pub fn init(format: LogFormat, default_filter: &str, output: Output) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let writer = match output {
        Output::Stdout => BoxMakeWriter::new(std::io::stdout),
        Output::Stderr => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        // Span fields (task, workspace) go into each line's "span" and "spans", the event's
        // own fields into "fields".
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}
