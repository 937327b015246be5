//! Trace export: the tracer provider behind the `tracing-opentelemetry` layer, with the
//! guide's, GenAI and OpenInference attributes added to each agent span, and every span
//! that is dropped or fails to export counted.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanId, Status as SpanStatus};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::config::{Config, OtlpProtocol, TracesExporter};
use crate::error::{Error, Result};
use crate::execution::{AgentSpanNames, Execution, Status};
use crate::stats::TelemetryStats;

/// Builds the tracer provider for the configured exporter, or `None` for `none`.
pub(crate) fn provider(
    config: &Config,
    custom: Option<BoxedSpanExporter>,
    resource: Resource,
    names: Arc<AgentSpanNames>,
    stats: Arc<TelemetryStats>,
) -> Result<Option<SdkTracerProvider>> {
    let in_flight = Arc::new(AtomicU64::new(0));
    let counting = |inner| CountingExporter::new(inner, Arc::clone(&stats), Arc::clone(&in_flight));
    let batch = match (custom, config.traces_exporter) {
        (Some(custom), _) => batch(counting(Exporter::Boxed(custom)), config),
        (None, TracesExporter::None) => return Ok(None),
        (None, TracesExporter::Console) => batch(
            counting(Exporter::Boxed(Box::new(opentelemetry_stdout::SpanExporter::default()))),
            config,
        ),
        (None, TracesExporter::Otlp) => batch(counting(otlp_exporter(config)?), config),
    };
    let processor = AgentSpanProcessor {
        inner: batch,
        names,
        stats,
        in_flight,
        max_queue_size: config.batch.max_queue_size as u64,
        shut_down: AtomicBool::new(false),
    };
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build(),
    ))
}

fn batch(exporter: CountingExporter, config: &Config) -> BatchSpanProcessor {
    let settings = config.batch;
    let batch_config = BatchConfigBuilder::default()
        .with_max_queue_size(settings.max_queue_size)
        .with_max_export_batch_size(settings.max_export_batch_size)
        .with_scheduled_delay(settings.scheduled_delay)
        .build();
    BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch_config)
        .build()
}

fn otlp_exporter(config: &Config) -> Result<Exporter> {
    use opentelemetry_otlp::WithExportConfig;
    let endpoint = config.otlp.resolved_endpoint();
    let failed = |e: opentelemetry_otlp::ExporterBuildError| Error::TraceExporter {
        exporter: "otlp",
        source: Box::new(e),
    };
    match config.otlp.protocol {
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(config.otlp.timeout)
            .build()
            .map(|exporter| Exporter::Boxed(Box::new(exporter)))
            .map_err(failed),
        #[cfg(feature = "grpc")]
        OtlpProtocol::Grpc => {
            let runtime = tokio::runtime::Handle::try_current().map_err(|e| Error::TraceExporter {
                exporter: "otlp (grpc)",
                source: format!("OTLP/gRPC must be set up inside a tokio runtime: {e}").into(),
            })?;
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(config.otlp.timeout)
                .build()
                .map(|exporter| Exporter::Grpc(exporter, runtime.clone()))
                .map_err(failed)
        }
        #[cfg(not(feature = "grpc"))]
        OtlpProtocol::Grpc => Err(Error::invalid(
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "grpc",
            "OTLP/gRPC needs agent-telemetry's `grpc` cargo feature",
        )),
    }
}

/// An exporter made object-safe: [`SpanExporter`] returns `impl Future`, so it cannot be
/// boxed as it is.
pub(crate) type BoxedSpanExporter = Box<dyn DynSpanExporter>;

type ExportFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = OTelSdkResult> + Send + 'a>>;

pub(crate) trait DynSpanExporter: Send + Sync + std::fmt::Debug {
    fn export_boxed(&self, batch: Vec<SpanData>) -> ExportFuture<'_>;
    fn shutdown_boxed(&self, timeout: Duration) -> OTelSdkResult;
    fn set_resource_boxed(&mut self, resource: &Resource);
}

impl<E: SpanExporter + 'static> DynSpanExporter for E {
    fn export_boxed(&self, batch: Vec<SpanData>) -> ExportFuture<'_> {
        Box::pin(self.export(batch))
    }

    fn shutdown_boxed(&self, timeout: Duration) -> OTelSdkResult {
        self.shutdown_with_timeout(timeout)
    }

    fn set_resource_boxed(&mut self, resource: &Resource) {
        self.set_resource(resource);
    }
}

/// The exporters this crate can run, as one type for the batch processor.
#[derive(Debug)]
// Built once per provider: the size of the gRPC variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Exporter {
    Boxed(BoxedSpanExporter),
    /// tonic needs a tokio reactor; the batch processor's thread has none, so each export
    /// runs on the runtime the exporter was built in.
    #[cfg(feature = "grpc")]
    Grpc(opentelemetry_otlp::SpanExporter, tokio::runtime::Handle),
}

impl Exporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        match self {
            Exporter::Boxed(exporter) => exporter.export_boxed(batch).await,
            #[cfg(feature = "grpc")]
            Exporter::Grpc(exporter, runtime) => runtime.block_on(exporter.export(batch)),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match self {
            Exporter::Boxed(exporter) => exporter.shutdown_boxed(timeout),
            #[cfg(feature = "grpc")]
            Exporter::Grpc(exporter, _) => exporter.shutdown_with_timeout(timeout),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        match self {
            Exporter::Boxed(exporter) => exporter.set_resource_boxed(resource),
            #[cfg(feature = "grpc")]
            Exporter::Grpc(exporter, _) => exporter.set_resource(resource),
        }
    }
}

/// Counts what the exporter delivers and loses, and warns once when exports start failing.
#[derive(Debug)]
struct CountingExporter {
    inner: Exporter,
    stats: Arc<TelemetryStats>,
    in_flight: Arc<AtomicU64>,
    failing: AtomicBool,
}

impl CountingExporter {
    fn new(inner: Exporter, stats: Arc<TelemetryStats>, in_flight: Arc<AtomicU64>) -> Self {
        CountingExporter {
            inner,
            stats,
            in_flight,
            failing: AtomicBool::new(false),
        }
    }
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let count = batch.len() as u64;
        let result = self.inner.export(batch).await;
        self.in_flight.fetch_sub(count, Ordering::Relaxed);
        match &result {
            Ok(()) => {
                TelemetryStats::add(&self.stats.spans_exported, count);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(target: "agent_telemetry::traces", "span export recovered");
                }
            }
            Err(error) => {
                TelemetryStats::add(&self.stats.spans_export_failed, count);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(target: "agent_telemetry::traces", %error, "span export failed; lost spans are counted in agent_telemetry_spans_export_failed_total until it recovers");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Adds the agent attributes to each agent span, then queues it, dropping (and counting)
/// it when the batch processor's queue is full rather than letting the SDK drop it silently.
#[derive(Debug)]
struct AgentSpanProcessor {
    inner: BatchSpanProcessor,
    names: Arc<AgentSpanNames>,
    stats: Arc<TelemetryStats>,
    /// Spans queued and not yet through an export: never more than the queue holds.
    in_flight: Arc<AtomicU64>,
    max_queue_size: u64,
    shut_down: AtomicBool,
}

impl SpanProcessor for AgentSpanProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, mut span: SpanData) {
        if self.names.matches(&span.name) {
            add_agent_attributes(&mut span);
        }
        let queued = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if queued >= self.max_queue_size || self.shut_down.load(Ordering::Relaxed) {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            if self.stats.spans_dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    target: "agent_telemetry::traces",
                    queue = self.max_queue_size,
                    "span export queue full; dropping spans and counting them in agent_telemetry_spans_dropped_total"
                );
            }
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.shut_down.store(true, Ordering::Relaxed);
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// What the execution layer knows of a span that the SDK does not: its resolved status.
struct SpanOutcome {
    span_id: SpanId,
    agent_name: StringValue,
    status: Status,
    error_type: Option<StringValue>,
    description: Option<String>,
}

thread_local! {
    // The OpenTelemetry layer ends a span right after the execution layer closed it, on the
    // same thread, so one slot per thread carries the outcome across.
    static OUTCOME: RefCell<Option<SpanOutcome>> = const { RefCell::new(None) };
}

/// Called by the execution layer just before the OpenTelemetry layer ends the span.
pub(crate) fn hand_over_outcome(span_id: SpanId, execution: &Execution<'_>) {
    let outcome = SpanOutcome {
        span_id,
        agent_name: execution.agent_name.to_owned().into(),
        status: execution.status,
        error_type: execution.failure.map(|f| f.error_type().to_owned().into()),
        description: execution.failure.map(|f| f.description().to_owned()),
    };
    OUTCOME.with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            *slot = Some(outcome);
        }
    });
}

fn take_outcome(span_id: SpanId) -> Option<SpanOutcome> {
    OUTCOME.with(|slot| {
        let mut slot = slot.try_borrow_mut().ok()?;
        slot.as_ref()
            .is_some_and(|o| o.span_id == span_id)
            .then(|| slot.take())
            .flatten()
    })
}

fn add_agent_attributes(span: &mut SpanData) {
    let outcome = take_outcome(span.span_context.span_id());
    let agent_name = match &outcome {
        Some(outcome) => outcome.agent_name.clone(),
        None => recorded_agent_name(&span.attributes),
    };
    let attributes = &mut span.attributes;
    set(attributes, "agent.name", agent_name.clone());
    set(attributes, "gen_ai.operation.name", "invoke_agent");
    set(attributes, "gen_ai.agent.name", agent_name);
    set(attributes, "openinference.span.kind", "AGENT");
    let Some(outcome) = outcome else { return };
    set(attributes, "result.status", outcome.status.as_str());
    if let Some(error_type) = outcome.error_type {
        set(attributes, "error.type", error_type);
        span.status = SpanStatus::error(outcome.description.unwrap_or_default());
    } else if matches!(span.status, SpanStatus::Error { .. }) {
        // An ERROR event in a child span marked this one; the agent itself succeeded.
        span.status = SpanStatus::Unset;
    }
}

fn recorded_agent_name(attributes: &[KeyValue]) -> StringValue {
    attributes
        .iter()
        .find(|kv| kv.key.as_str() == "agent_name" || kv.key.as_str() == "agent.name")
        .map_or_else(
            || crate::execution::UNKNOWN_AGENT.into(),
            |kv| kv.value.as_str().into_owned().into(),
        )
}

/// Sets `key`, replacing a value recorded under the same key so no key appears twice.
fn set(attributes: &mut Vec<KeyValue>, key: &'static str, value: impl Into<Value>) {
    let value = value.into();
    match attributes.iter_mut().find(|kv| kv.key.as_str() == key) {
        Some(existing) => existing.value = value,
        None => attributes.push(KeyValue::new(key, value)),
    }
}
