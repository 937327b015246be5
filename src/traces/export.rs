//! The exporter side: the configured exporter behind the span processor, counting what it
//! delivers and loses.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

use super::otlp_http::ExactHeaders;
use crate::config::{Config, OtlpProtocol};
use crate::error::{Error, Result};
use crate::outages::OutageWarnings;
use crate::panics;
use crate::stats::TelemetryStats;

/// The largest OTLP request body sent; the span thread cuts export batches well below it
/// (see `processor::EXPORT_BATCH_BYTES`), so only a span larger than this alone is refused.
const MAX_REQUEST_BODY_BYTES: usize = 16 * 1024 * 1024;

pub(crate) fn otlp_exporter(config: &Config) -> Result<Exporter> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let target = config.otlp.target("OTEL_EXPORTER_OTLP_ENDPOINT")?;
    let failed = |e: opentelemetry_otlp::ExporterBuildError| Error::TraceExporter {
        exporter: "otlp",
        source: Box::new(e),
    };
    match config.otlp.protocol {
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(target.url)
            .with_timeout(config.otlp.timeout)
            .with_http_client(ExactHeaders::new(config.otlp.timeout, &target.headers)?)
            .with_max_request_body_size(MAX_REQUEST_BODY_BYTES)
            .build()
            .map(|exporter| Exporter::Boxed(Box::new(exporter)))
            .map_err(failed),
        #[cfg(feature = "grpc")]
        OtlpProtocol::Grpc => {
            use opentelemetry_otlp::WithTonicConfig;
            let runtime = tokio::runtime::Handle::try_current().map_err(|e| Error::TraceExporter {
                exporter: "otlp (grpc)",
                source: format!("OTLP/gRPC must be set up inside a tokio runtime: {e}").into(),
            })?;
            let _entered = runtime.enter();
            let mut headers = http::HeaderMap::new();
            for (name, value) in &target.headers {
                let name = http::HeaderName::from_bytes(name.as_bytes());
                // Checked as HTTP header names and values already.
                if let (Ok(name), Ok(value)) = (name, http::HeaderValue::from_str(value)) {
                    headers.insert(name, value);
                }
            }
            let metadata = opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers);
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(target.url)
                .with_timeout(config.otlp.timeout)
                .with_metadata(metadata)
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
    fn shutdown_boxed(&self) -> OTelSdkResult;
    fn shutdown_with_timeout_boxed(&self, timeout: Duration) -> OTelSdkResult;
    fn set_resource_boxed(&mut self, resource: &Resource);
}

impl<E: SpanExporter + 'static> DynSpanExporter for E {
    fn export_boxed(&self, batch: Vec<SpanData>) -> ExportFuture<'_> {
        Box::pin(self.export(batch))
    }

    fn shutdown_boxed(&self) -> OTelSdkResult {
        self.shutdown()
    }

    fn shutdown_with_timeout_boxed(&self, timeout: Duration) -> OTelSdkResult {
        self.shutdown_with_timeout(timeout)
    }

    fn set_resource_boxed(&mut self, resource: &Resource) {
        self.set_resource(resource);
    }
}

/// The exporters this crate can run, as one type for the span processor.
#[derive(Debug)]
// Built once per provider: the size of the gRPC variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Exporter {
    Boxed(BoxedSpanExporter),
    /// tonic needs a tokio reactor; the span thread has none, so each export
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

    /// What the span processor calls; an exporter may implement this one alone.
    fn shutdown(&self) -> OTelSdkResult {
        match self {
            Exporter::Boxed(exporter) => exporter.shutdown_boxed(),
            #[cfg(feature = "grpc")]
            Exporter::Grpc(exporter, _) => exporter.shutdown(),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match self {
            Exporter::Boxed(exporter) => exporter.shutdown_with_timeout_boxed(timeout),
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

/// Counts what the exporter delivers and loses, and warns when exports start failing and when
/// they recover. An export that panics counts as a failed one, so the span thread
/// lives on.
#[derive(Debug)]
pub(crate) struct CountingExporter {
    inner: Exporter,
    stats: Arc<TelemetryStats>,
    outages: Mutex<OutageWarnings>,
}

impl CountingExporter {
    pub(crate) fn new(inner: Exporter, stats: Arc<TelemetryStats>) -> Self {
        CountingExporter {
            inner,
            stats,
            outages: Mutex::default(),
        }
    }
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let count = batch.len() as u64;
        let result = panics::catching_async(self.inner.export(batch))
            .await
            .unwrap_or_else(|panic| Err(panicked(&panic)));
        // Only the span thread exports: the lock is never contended.
        let mut outages = self.outages.lock().unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(()) => {
                TelemetryStats::add(&self.stats.spans_exported, count);
                if outages.succeeded() {
                    tracing::info!(target: "agent_telemetry::traces", "span export recovered");
                }
            }
            Err(error) => {
                TelemetryStats::add(&self.stats.spans_export_failed, count);
                if outages.failed() {
                    tracing::warn!(target: "agent_telemetry::traces", %error, "span export failed; lost spans are counted in agent_telemetry_spans_export_failed_total until it recovers");
                }
            }
        }
        result
    }

    fn shutdown(&self) -> OTelSdkResult {
        report_shutdown(|| self.inner.shutdown())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        report_shutdown(|| self.inner.shutdown_with_timeout(timeout))
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The span processor answers shutdown with the exports' result (the spans went out), so an
/// exporter's failure to shut down is reported here.
fn report_shutdown(shutdown: impl FnOnce() -> OTelSdkResult) -> OTelSdkResult {
    let result = panics::catching(shutdown).unwrap_or_else(|panic| Err(panicked(&panic)));
    if let Err(error) = &result {
        tracing::warn!(target: "agent_telemetry::traces", %error, "the span exporter failed to shut down, after the final export");
    }
    result
}

/// The error an exporter's panic becomes, for the span processor to report.
fn panicked(panic: &str) -> OTelSdkError {
    OTelSdkError::InternalFailure(format!("the span exporter panicked: {panic}"))
}
