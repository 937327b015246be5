//! Trace export. Agent spans are built by [`AgentTracer`]; every other span the `RUST_LOG`
//! filter selects is built by `tracing-opentelemetry` on a provider sharing the same
//! processor, so both reach one exporter and every dropped or failed span is counted.

mod agent_span;
mod export;
mod otlp_http;
mod processor;
mod span_size;

use std::sync::Arc;

use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use opentelemetry_sdk::Resource;

use agent_span::SpanBuilder;
pub(crate) use agent_span::{AgentSpan, AgentTracer};
pub(crate) use export::BoxedSpanExporter;
use export::{CountingExporter, Exporter};
use processor::{CountingProcessor, SharedProcessor};

use crate::config::{Config, TracesExporter};
use crate::error::Result;
use crate::scrub::Scrubber;
use crate::stats::TelemetryStats;

/// The two ways into the one exporter.
pub(crate) struct Traces {
    /// For `tracing-opentelemetry`, and for flushing and shutting the export down.
    pub provider: SdkTracerProvider,
    pub agents: Arc<AgentTracer>,
}

/// Builds the export for the configured exporter, or `None` for `none`.
pub(crate) fn build(
    config: &Config,
    custom: Option<BoxedSpanExporter>,
    resource: &Resource,
    stats: &Arc<TelemetryStats>,
    scrubber: &Arc<Scrubber>,
) -> Result<Option<Traces>> {
    let exporter = match (custom, config.traces_exporter) {
        (Some(custom), _) => Exporter::Boxed(custom),
        (None, TracesExporter::None) => return Ok(None),
        (None, TracesExporter::Console) => Exporter::Boxed(Box::new(opentelemetry_stdout::SpanExporter::default())),
        (None, TracesExporter::Otlp) => export::otlp_exporter(config)?,
    };
    let mut exporter = CountingExporter::new(exporter, Arc::clone(stats));
    // Set before the processor's thread owns it: the provider can then no longer reach it.
    exporter.set_resource(resource);
    let processor = Arc::new(CountingProcessor::start(
        exporter,
        config.batch,
        SpanBuilder::new(config.attribute_value_chars(), Arc::clone(scrubber)),
        config.shutdown_timeout,
        Arc::clone(stats),
    )?);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(SharedProcessor(Arc::clone(&processor)))
        .with_sampler(config.sampler.clone())
        .with_resource(resource.clone())
        .build();
    Ok(Some(Traces {
        provider,
        agents: Arc::new(AgentTracer::new(
            processor,
            config.sampler.clone(),
            config.attribute_value_chars(),
            Arc::clone(scrubber),
        )),
    }))
}
