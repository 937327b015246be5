//! The span processor every exported span goes through, agent spans and the spans
//! `tracing-opentelemetry` builds alike: it drops (and counts) a span when the batch queue is
//! full, rather than letting the SDK drop it silently.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Span, SpanData, SpanProcessor};
use opentelemetry_sdk::Resource;

use crate::stats::{first_time, TelemetryStats};

/// The batch processor with the drop accounting the SDK does not expose.
#[derive(Debug)]
pub(crate) struct CountingProcessor {
    inner: BatchSpanProcessor,
    stats: Arc<TelemetryStats>,
    /// Spans queued and not yet through an export: never more than the queue holds.
    in_flight: Arc<AtomicU64>,
    max_queue_size: u64,
    shut_down: AtomicBool,
    /// Whether the first drop from this queue was reported.
    warned_full: AtomicBool,
    /// Whether the first span ended after shutdown was reported.
    warned_shut_down: AtomicBool,
}

impl CountingProcessor {
    pub(crate) fn new(
        inner: BatchSpanProcessor,
        stats: Arc<TelemetryStats>,
        in_flight: Arc<AtomicU64>,
        max_queue_size: usize,
    ) -> Self {
        CountingProcessor {
            inner,
            stats,
            in_flight,
            max_queue_size: max_queue_size as u64,
            shut_down: AtomicBool::new(false),
            warned_full: AtomicBool::new(false),
            warned_shut_down: AtomicBool::new(false),
        }
    }

    /// Queues a finished span, or drops and counts it when the queue is full or the export
    /// has shut down.
    pub(crate) fn queue(&self, span: SpanData) {
        if self.shut_down.load(Ordering::Relaxed) {
            self.count_dropped(1);
            if first_time(&self.warned_shut_down) {
                tracing::warn!(
                    target: "agent_telemetry::traces",
                    "a span ended after the span export shut down; dropping it and counting it in agent_telemetry_spans_dropped_total"
                );
            }
            return;
        }
        let queued = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if queued >= self.max_queue_size {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.count_dropped(1);
            if first_time(&self.warned_full) {
                tracing::warn!(
                    target: "agent_telemetry::traces",
                    queue = "span export queue (OTEL_BSP_MAX_QUEUE_SIZE)",
                    capacity = self.max_queue_size,
                    "queue full on the way to the span exporter; dropping spans and counting them in agent_telemetry_spans_dropped_total"
                );
            }
            return;
        }
        self.inner.on_end(span);
    }

    /// Counts spans lost on their way to the exporter. The queue that dropped them warns.
    pub(crate) fn count_dropped(&self, spans: u64) {
        TelemetryStats::add(&self.stats.spans_dropped, spans);
    }
}

/// The provider's handle on the one processor the agent spans also use.
#[derive(Debug)]
pub(crate) struct SharedProcessor(pub Arc<CountingProcessor>);

impl SpanProcessor for SharedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.0.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.0.queue(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shut_down.store(true, Ordering::Relaxed);
        self.0.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, _: &Resource) {
        // Set on the batch processor before it was shared (see `traces::build`).
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::SystemTime;

    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status};
    use opentelemetry::InstrumentationScope;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanEvents, SpanLinks};

    use super::*;
    use crate::test_support::Warnings;

    fn span() -> SpanData {
        SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed("tool_call"),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("test").build(),
        }
    }

    #[test]
    fn spans_after_shutdown_are_counted_and_the_warning_says_why() {
        let stats = Arc::new(TelemetryStats::default());
        let batch = BatchSpanProcessor::builder(InMemorySpanExporter::default()).build();
        let processor = Arc::new(CountingProcessor::new(batch, Arc::clone(&stats), Arc::default(), 16));
        SharedProcessor(Arc::clone(&processor))
            .shutdown_with_timeout(Duration::from_secs(5))
            .unwrap();
        let warnings = Warnings::with_target("agent_telemetry::traces");
        tracing::dispatcher::with_default(&warnings.dispatch(), || {
            for _ in 0..3 {
                processor.queue(span());
            }
        });
        assert_eq!(TelemetryStats::get(&stats.spans_dropped), 3);
        let warnings = warnings.messages();
        assert_eq!(warnings.len(), 1, "one warning for the three: {warnings:?}");
        assert!(warnings[0].contains("after the span export shut down"), "{warnings:?}");
        assert!(!warnings[0].contains("queue full"), "{warnings:?}");
    }
}
