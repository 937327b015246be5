//! The one error type of the crate.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong while installing or running the telemetry.
///
/// Every variant names the setting or resource it is about, so the message alone tells a
/// user what to fix; the underlying cause is kept as [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value (builder argument or environment variable) is not valid.
    #[error("invalid value {value:?} for {setting}: {reason}")]
    InvalidSetting {
        /// The setting: an environment variable name or a builder method.
        setting: String,
        /// The value that was given.
        value: String,
        /// Why it was rejected and what is expected instead.
        reason: String,
    },

    /// The `/metrics` server could not listen on its address (port in use, no permission).
    #[error("cannot serve /metrics on {addr} (AGENT_TELEMETRY_METRICS_ADDR): {source}")]
    MetricsBind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },

    /// The log directory could not be created or a log file in it could not be opened.
    #[error("cannot write log files in {} (AGENT_TELEMETRY_LOG_DIR): {source}", path.display())]
    LogDir {
        /// The directory that was asked for.
        path: PathBuf,
        /// Why it could not be used.
        #[source]
        source: std::io::Error,
    },

    /// The trace exporter could not be built.
    #[error("cannot build the {exporter} trace exporter (OTEL_TRACES_EXPORTER): {source}")]
    TraceExporter {
        /// Which exporter was being built.
        exporter: &'static str,
        /// The exporter's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// The Prometheus pipeline could not be set up or encoded.
    #[error("Prometheus metrics: {source}")]
    Metrics {
        /// The Prometheus or OpenTelemetry error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A background thread of the telemetry could not be started.
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// The thread's name.
        name: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A global default subscriber was already installed.
    #[error("cannot install the global tracing subscriber: {source}")]
    GlobalSubscriber {
        /// The error from `tracing`.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A span could not join the trace of an incoming request.
    #[error("cannot continue the incoming trace: {source}")]
    Propagation {
        /// Why the span could not take the parent: it already started, or it is not traced.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A price list is not valid: the file (and the variable that named it) or the method,
    /// and the line.
    #[error("invalid model prices in {origin}, line {line}: {reason}")]
    Prices {
        /// Where the prices came from: a file and the variable that named it, or a method.
        origin: String,
        /// The line, from 1.
        line: usize,
        /// What is wrong and what is expected instead.
        reason: String,
    },

    /// A prices file could not be read.
    #[error("cannot read the model prices file {origin}: {source}")]
    PricesFile {
        /// The file, and the variable that named it.
        origin: String,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },

    /// Shutting a signal down did not complete cleanly or in time.
    #[error("shutdown of {signal} did not complete: {reason}")]
    Shutdown {
        /// The signal: `traces`, `logs` or `metrics`.
        signal: &'static str,
        /// What went wrong.
        reason: String,
    },
}

impl Error {
    pub(crate) fn invalid(setting: impl Into<String>, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidSetting {
            setting: setting.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
