//! Trace export: agent spans and the spans `tracing-opentelemetry` builds, through one queue
//! and one span thread to one exporter, every span exported or counted.
//!
//! ```text
//!  agent threads                                      span thread (span_thread.rs)
//!  ─────────────                                      ────────────────────────────
//!  AgentTracer (agent_span.rs)                        take handed-over batches,
//!    open: ids, sampling; record fields               collect gathering ones
//!    close: FinishedSpan ──┐                          build agent spans (SpanBuilder),
//!  SdkProcessor            ├─▶ thread's ThreadSpans   scrub and cut built ones,
//!    (sdk_processor.rs)    │   (batch.rs), 64 spans ─▶ batch by spans and bytes
//!    on_end: SpanData ─────┘   in SpanQueue           ─▶ CountingExporter (export.rs)
//!                              (span_queue.rs)             ─▶ the configured exporter
//!                  Message::{Spans, Wake, Flush, Shutdown} over one channel (handoff.rs)
//! ```
//!
//! Invariants a change must keep:
//!
//! - every span is exported, counted as failed by the exporter, or counted as dropped: a full
//!   queue, a span after shutdown, a span thread that panicked (it counts what it held);
//! - the queue is bounded by `OTEL_BSP_MAX_QUEUE_SIZE` spans and 32 MiB waiting
//!   ([`crate::config::BatchSettings`]); a batch still gathering on a thread (at most 64
//!   spans) and the export batch come on top;
//! - nothing on an agent's thread waits for the span thread or the network: a full queue
//!   drops, never blocks;
//! - a thread's full batch is handed over under that thread's lock, and shutdown closes the
//!   threads' batches before its last collection: no batch is on its way after it;
//! - at most one `Wake` is in the channel, and at most [`handoff`]'s `MAX_ASKS_WAITING`
//!   flushes and shutdowns: the channel needs no bound of its own;
//! - an export request holds at most `max_export_bytes` of spans, or one heavier span alone;
//! - whatever the exporter or its HTTP client emit is not exported (telemetry is suppressed
//!   on the span thread), so export never loops.

mod agent_span;
mod attributes;
mod batch;
mod export;
mod fields;
mod handoff;
mod otlp_http;
mod sdk_processor;
mod span_queue;
mod span_size;
mod span_thread;

use std::sync::Arc;

use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use opentelemetry_sdk::Resource;

pub(crate) use agent_span::{AgentSpan, AgentTracer};
pub(crate) use export::BoxedSpanExporter;
use export::{CountingExporter, Exporter};
use sdk_processor::SharedProcessor;
use span_queue::SpanQueue;
use span_thread::SpanBuilder;

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
    // Set before the span thread owns it: the provider can then no longer reach it.
    exporter.set_resource(resource);
    let queue = Arc::new(SpanQueue::start(
        exporter,
        config.batch,
        SpanBuilder::new(config.attribute_value_chars(), Arc::clone(scrubber)),
        config.shutdown_timeout,
        Arc::clone(stats),
    )?);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(SharedProcessor(Arc::clone(&queue)))
        .with_sampler(config.sampler.clone())
        .with_resource(resource.clone())
        .build();
    Ok(Some(Traces {
        provider,
        agents: Arc::new(AgentTracer::new(
            queue,
            config.sampler.clone(),
            config.attribute_value_chars(),
            Arc::clone(scrubber),
        )),
    }))
}
