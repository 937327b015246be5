//! # agent-telemetry
//!
//! Production monitoring for AI agents from one line of instrumentation: the Rust form of the
//! framework's monitoring guide (Prometheus, Grafana, Alertmanager, ELK and OpenTelemetry), with
//! the guide's metric names, labels, buckets and log fields. Register one `tracing` layer at startup, annotate agent
//! functions with [`instrument`] (or `#[tracing::instrument(name = "agent_execution")]`), and
//! every such span becomes:
//!
//! - an OTLP trace span with the guide's `agent.name`, `task` and `result.status` attributes
//!   plus the GenAI and OpenInference ones, built by this crate on the OpenTelemetry SDK (the
//!   other spans `RUST_LOG` selects go through `tracing-opentelemetry`, as its children);
//! - Prometheus metrics `agent_executions_total`, `agent_execution_duration_seconds`,
//!   `framework_memory_usage_bytes` and `framework_info`, served on `/metrics`;
//! - one Filebeat-ready JSON log line carrying the span's `trace.id`.
//!
//! Beyond the guide, the model, provider and tokens an execution and its model calls record
//! (in the OpenTelemetry GenAI conventions' names) become tokens and model calls per agent
//! and model in all three signals, and spend in the metrics and the log line; spend needs
//! [`ModelPrices`].
//!
//! ```
//! use agent_telemetry::{AgentTelemetry, TracesExporter};
//!
//! #[agent_telemetry::instrument]
//! fn execute_agent(agent_name: &str, task: &str) -> Result<String, std::io::Error> {
//!     Ok(format!("{agent_name} did {task}"))
//! }
//!
//! # fn main() -> Result<(), agent_telemetry::Error> {
//! let telemetry = AgentTelemetry::builder()
//!     .with_service_name("my-name-is-claude")
//!     .with_metrics_addr(([127, 0, 0, 1], 0)) // the guide's default is 0.0.0.0:8000
//!     .with_traces_exporter(TracesExporter::None) // default: OTLP to localhost:4318
//!     .ignore_environment()
//!     .try_init()?;
//!
//! execute_agent("backend-engineer", "Implement API").unwrap();
//!
//! let metrics = telemetry.metrics().render()?;
//! assert!(metrics.contains("agent_execution_duration_seconds_bucket"));
//! telemetry.shutdown()?; // flushes spans and log lines
//! # Ok(())
//! # }
//! ```
//!
//! # Configuration: the environment wins
//!
//! Each setting has a builder method (on [`AgentTelemetryBuilder`]) and most have an
//! environment variable, named in the method's documentation. The builder sets the
//! application's values; the environment is applied over them, so an operator can change a
//! deployment without a rebuild. [`AgentTelemetryBuilder::ignore_environment`] reads no
//! variable at all. (opentelemetry-otlp's own builders do the opposite, code over
//! environment; this crate reads the `OTEL_*` variables itself and passes the result on.) A
//! bad value is an [`Error`] that names the variable or the method.
//!
//! # Async agents
//!
//! A timed-out or cancelled `async` execution is reported as `cancelled`, not as a success,
//! when annotated with [`instrument`] or wrapped with [`AgentInstrument::instrument_agent`];
//! see [`Status::Cancelled`].

#![deny(missing_docs, missing_debug_implementations, rustdoc::broken_intra_doc_links)]
#![warn(clippy::pedantic)]
#![allow(clippy::module_name_repetitions, clippy::must_use_candidate)]

mod background;
mod cancellation;
mod config;
mod error;
mod execution;
mod filter;
mod gen_ai;
mod install;
mod layer;
mod logs;
mod metrics;
mod outages;
mod panics;
mod per_thread;
mod prices;
mod printer;
pub mod propagation;
mod recorded;
mod scrub;
mod stats;
mod status;
#[cfg(test)]
mod test_support;
mod text;
mod traces;

/// The function's `agent_name` and `task` arguments name the agent and the task, as with
/// `tracing::instrument`; `skip` leaves out the others.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tracing_subscriber::layer::SubscriberExt;
///
/// #[agent_telemetry::instrument(skip(work))]
/// async fn execute_agent(agent_name: &str, task: &str, work: Duration) -> Result<String, std::io::Error> {
///     tokio::time::sleep(work).await;
///     Ok(format!("{agent_name} did {task}"))
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (layer, telemetry) = agent_telemetry::AgentTelemetry::builder()
///     .ignore_environment()
///     .without_metrics_server()
///     .with_traces_exporter(agent_telemetry::TracesExporter::None)
///     .with_log_writer(std::io::sink())
///     .build()?;
/// let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
/// let _default = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
/// runtime.block_on(async {
///     // Timed out: reported as cancelled, not as a fast success.
///     let slow = execute_agent("researcher", "Survey", Duration::from_secs(30));
///     assert!(tokio::time::timeout(Duration::from_millis(10), slow).await.is_err());
/// });
/// let metrics = telemetry.metrics().render()?;
/// assert!(metrics.contains(r#"agent_executions_total{agent_name="researcher",status="cancelled"} 1"#));
/// # Ok(())
/// # }
/// ```
pub use agent_telemetry_macros::instrument;
pub use cancellation::{AgentInstrument, ReportsCancellation};
pub use config::{LogFormat, OtlpProtocol, TaskCapture, TracesExporter, DEFAULT_DURATION_BUCKETS};
pub use error::{Error, Result};
pub use install::{AgentTelemetry, AgentTelemetryBuilder, TelemetryLayer};
pub use metrics::{MetricsHandle, OVERFLOW_AGENT_NAME};
pub use prices::{ModelPrice, ModelPrices};
pub use scrub::{Scrubbing, REDACTED};
pub use status::Status;

/// What the [`instrument`] attribute expands to refers to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::cancellation::ReportsCancellation;

    /// What the attribute's closure around a delegating body consumes, so that the closure
    /// is `FnOnce` and the borrows the body hands on keep the function's lifetimes.
    #[derive(Debug)]
    pub struct CalledOnce;

    impl CalledOnce {
        /// Consumes the token.
        pub fn called(self) {}
    }
}
