//! Prometheus metrics with the guide's names, through the OpenTelemetry SDK and
//! `opentelemetry-prometheus` on a [`prometheus::Registry`].

mod capped_names;
mod coalesced_renders;
mod held_answers;
mod open_connections;
pub(crate) mod series_limits;
pub(crate) mod server;
mod spend;
mod thread_series;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::metrics::{BoundCounter, BoundHistogram, Gauge, Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::Resource;
use prometheus::{Encoder, TextEncoder};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::execution::Execution;
use crate::gen_ai::Usage;
use crate::per_thread::PerThread;
use crate::stats::TelemetryStats;
use crate::status::Status;
use crate::text::{cut, MAX_LABEL_CHARS};
use capped_names::CappedNames;
use series_limits::SeriesLimits;
use spend::SpendMetrics;
use thread_series::{Holding, Instruments, ThreadSeries};

pub use crate::text::OVERFLOW_AGENT_NAME;

/// A cheap, cloneable handle that renders the Prometheus text exposition of the telemetry's
/// registry: what `GET /metrics` serves, for applications that mount it in their own server.
#[derive(Clone, Debug)]
pub struct MetricsHandle {
    registry: prometheus::Registry,
}

impl MetricsHandle {
    /// Renders the current metrics in the Prometheus text format (version 0.0.4).
    ///
    /// The memory gauge is read now, at render time.
    ///
    /// # Errors
    ///
    /// [`Error::Metrics`] if the registry holds a metric that cannot be encoded.
    pub fn render(&self) -> Result<String> {
        let mut text = Vec::with_capacity(4096);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .map_err(|e| Error::Metrics { source: Box::new(e) })?;
        String::from_utf8(text).map_err(|e| Error::Metrics { source: Box::new(e) })
    }

    /// The `Content-Type` of [`render`](Self::render)'s output.
    pub fn content_type(&self) -> &'static str {
        prometheus::TEXT_FORMAT
    }

    /// The underlying registry, to register an application's own collectors beside ours.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }
}

/// The series of one `agent_name`, each bound on first use (a bound series is exported from
/// then on, so binding early would show zeros nobody recorded); recording into a bound series
/// takes no lookup or hashing, only the update itself (the histogram's under its series' lock,
/// which threads take in turn: each hands its executions over in runs, see
/// [`ThreadSeries`]).
struct AgentSeries {
    name: KeyValue,
    success: OnceLock<BoundCounter<u64>>,
    failure: OnceLock<BoundCounter<u64>>,
    cancelled: OnceLock<BoundCounter<u64>>,
    duration: OnceLock<BoundHistogram<f64>>,
}

impl AgentSeries {
    fn new(agent_name: &str) -> Self {
        AgentSeries {
            name: KeyValue::new("agent_name", agent_name.to_owned()),
            success: OnceLock::new(),
            failure: OnceLock::new(),
            cancelled: OnceLock::new(),
            duration: OnceLock::new(),
        }
    }

    fn record(&self, to: &Instruments, status: Status, seconds: f64) {
        let slot = match status {
            Status::Success => &self.success,
            Status::Failure => &self.failure,
            Status::Cancelled => &self.cancelled,
        };
        slot.get_or_init(|| {
            to.executions
                .bind(&[self.name.clone(), KeyValue::new("status", status.as_str())])
        })
        .add(1);
        self.duration
            .get_or_init(|| to.duration.bind(std::slice::from_ref(&self.name)))
            .record(seconds);
    }
}

/// The instruments the layer records into.
pub(crate) struct Metrics {
    provider: SdkMeterProvider,
    handle: MetricsHandle,
    instruments: Arc<Instruments>,
    threads: Arc<PerThread<ThreadSeries>>,
    series: CappedNames<Arc<AgentSeries>>,
    overflow: Arc<AgentSeries>,
    spend: SpendMetrics,
    stats: Arc<TelemetryStats>,
    // Kept so the info series lives as long as the provider.
    _info: Gauge<u64>,
}

impl Metrics {
    pub(crate) fn new(config: &Config, resource: Resource, stats: Arc<TelemetryStats>) -> Result<Self> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .without_target_info()
            .build()
            .map_err(|e| Error::Metrics { source: Box::new(e) })?;
        let provider = SdkMeterProvider::builder()
            .with_reader(exporter)
            .with_resource(resource)
            .with_view(
                SeriesLimits::new(config.max_agent_names, config.max_model_names, config.max_agent_models).view(),
            )
            .build();
        let meter = provider.meter("agent_telemetry");

        let executions = meter
            .u64_counter("agent_executions")
            .with_description("Total agent executions")
            .build();
        let duration = meter
            .f64_histogram("agent_execution_duration")
            .with_description("Agent execution duration")
            .with_unit("s")
            .with_boundaries(config.duration_buckets.clone())
            .build();
        let instruments = Arc::new(Instruments { executions, duration });
        let threads = Arc::new(PerThread::new(ThreadSeries::default));
        hand_over_before_collection(&meter, &threads, &instruments);
        meter
            .u64_observable_gauge("framework_memory_usage")
            .with_description("Framework memory usage in bytes")
            .with_unit("By")
            .with_callback(|observer| {
                // No reading (an unsupported platform) means no sample, never a false zero.
                if let Some(usage) = memory_stats::memory_stats() {
                    observer.observe(usage.physical_mem as u64, &[]);
                }
            })
            .build();
        let info = meter
            .u64_gauge("framework_info")
            .with_description("Framework version and configuration")
            .build();
        let label = |text: &str| cut(text, MAX_LABEL_CHARS).into_owned();
        info.record(
            1,
            &[
                KeyValue::new("version", label(&config.service_version)),
                KeyValue::new("environment", label(&config.environment)),
                KeyValue::new("scale", label(&config.scale)),
            ],
        );
        register_self_metrics(&meter, &stats);
        let spend = SpendMetrics::new(
            &meter,
            config.max_model_names,
            config.max_agent_models,
            config.model_prices.is_some(),
            Arc::clone(&stats),
        );

        Ok(Metrics {
            provider,
            handle: MetricsHandle { registry },
            instruments,
            threads,
            series: CappedNames::new(config.max_agent_names),
            overflow: Arc::new(AgentSeries::new(OVERFLOW_AGENT_NAME)),
            spend,
            stats,
            _info: info,
        })
    }

    pub(crate) fn handle(&self) -> MetricsHandle {
        self.handle.clone()
    }

    /// Records an execution in the calling thread's series, which the SDK sees at the latest
    /// when it next collects, and its tokens and spend.
    pub(crate) fn record(&self, execution: &Execution) {
        self.record_execution(execution);
        if let Some(usage) = &execution.usage {
            let (agent_name, admit) = (&execution.agent_name, &|name: &str| self.agent_label(name));
            self.spend.record_usage(agent_name, admit, usage);
            for call in &usage.calls {
                self.spend
                    .record_call(agent_name, admit, &call.model, call.status, call.seconds);
            }
        }
    }

    /// Records a model call counted as it ended (not by its execution), and, for one
    /// outside any execution, its tokens and spend (`usage_to_count`).
    pub(crate) fn record_model_call(
        &self,
        agent_name: &str,
        model: &str,
        status: Status,
        duration: Duration,
        usage_to_count: Option<&Usage>,
    ) {
        let admit = |name: &str| self.agent_label(name);
        self.spend
            .record_call(agent_name, &admit, model, status, duration.as_secs_f64());
        if let Some(usage) = usage_to_count {
            self.spend.record_usage(agent_name, &admit, usage);
        }
    }

    /// Counts token fields that were not non-negative integers.
    pub(crate) fn count_invalid_usage_fields(&self, fields: u32) {
        TelemetryStats::add(&self.stats.usage_fields_invalid, u64::from(fields));
    }

    fn record_execution(&self, execution: &Execution) {
        let (name, status) = (&execution.agent_name, execution.status);
        let seconds = execution.duration.as_secs_f64();
        let Some(_holding) = Holding::take() else {
            return self.series_for(name).record(&self.instruments, status, seconds);
        };
        let recorded = self.threads.with_mine(|mine| {
            let kept = if let Some(kept) = mine.find(name) {
                kept
            } else {
                let series = self.series_for(name);
                // Overflowed names are not kept: `series_for` counts each of their executions.
                if Arc::ptr_eq(&series, &self.overflow) {
                    return series.record(&self.instruments, status, seconds);
                }
                mine.remember(Arc::clone(name), series, &self.instruments)
            };
            mine.record(kept, status, seconds, &self.instruments);
        });
        // The threads' series are never closed; were they, the execution still counts.
        if recorded.is_none() {
            self.series_for(name).record(&self.instruments, status, seconds);
        }
    }

    /// The series of `agent_name`, or the overflow series once the cap is reached: each
    /// execution folded into it is counted.
    fn series_for(&self, agent_name: &str) -> Arc<AgentSeries> {
        let series = self.admitted(agent_name);
        if Arc::ptr_eq(&series, &self.overflow) {
            TelemetryStats::add(&self.stats.agent_names_overflowed, 1);
        }
        series
    }

    /// The `agent_name` label of `agent_name`: itself, or `__overflow__` once the cap is
    /// reached.
    fn agent_label(&self, agent_name: &str) -> KeyValue {
        self.admitted(agent_name).name.clone()
    }

    /// The series of `agent_name`, or the overflow series once the cap is reached.
    fn admitted(&self, agent_name: &str) -> Arc<AgentSeries> {
        self.series
            .get_or_admit(agent_name, || Arc::new(AgentSeries::new(agent_name)))
            .unwrap_or_else(|| Arc::clone(&self.overflow))
    }

    pub(crate) fn shutdown(&self) -> Result<()> {
        self.provider.shutdown().map_err(|e| Error::Shutdown {
            signal: "metrics",
            reason: e.to_string(),
        })
    }
}

/// Hands every thread's waiting executions to the SDK whenever it collects: it runs the
/// callbacks of observable instruments before it reads any aggregation
/// (`opentelemetry_sdk::metrics::pipeline`'s `produce`), so a render counts every execution
/// that ended before it. The instrument observes nothing and is never exported.
fn hand_over_before_collection(meter: &Meter, threads: &Arc<PerThread<ThreadSeries>>, to: &Arc<Instruments>) {
    let (threads, to) = (Arc::clone(threads), Arc::clone(to));
    meter
        .u64_observable_gauge("agent_telemetry_pending_executions")
        .with_callback(move |_| {
            // Held already (a collection from inside a recording): the next one takes them.
            if let Some(_holding) = Holding::take() {
                threads.visit(|thread| thread.hand_over(&to));
            }
        })
        .build();
}

fn register_self_metrics(meter: &Meter, stats: &Arc<TelemetryStats>) {
    type Read = fn(&TelemetryStats) -> &AtomicU64;
    let counters: [(&'static str, &'static str, Read); 16] = [
        (
            "agent_telemetry_log_lines_written",
            "JSON log lines written to their destination",
            |s| &s.log_lines_written,
        ),
        (
            "agent_telemetry_log_lines_dropped",
            "JSON log lines lost: queue full or write failed",
            |s| &s.log_lines_dropped,
        ),
        (
            "agent_telemetry_log_write_errors",
            "Failed writes to the log destination",
            |s| &s.log_write_errors,
        ),
        (
            "agent_telemetry_spans_dropped",
            "Spans dropped because a queue on their way to the exporter was full",
            |s| &s.spans_dropped,
        ),
        ("agent_telemetry_spans_exported", "Spans the exporter delivered", |s| {
            &s.spans_exported
        }),
        (
            "agent_telemetry_spans_export_failed",
            "Spans lost in failed exports",
            |s| &s.spans_export_failed,
        ),
        (
            "agent_telemetry_agent_names_overflowed",
            "Executions whose agent_name was folded into __overflow__ by the cardinality cap",
            |s| &s.agent_names_overflowed,
        ),
        (
            "agent_telemetry_model_names_overflowed",
            "Model calls and executions whose model label was folded into __overflow__ by the cardinality cap",
            |s| &s.model_names_overflowed,
        ),
        (
            "agent_telemetry_usage_fields_invalid",
            "Token fields ignored because their value was not a non-negative integer",
            |s| &s.usage_fields_invalid,
        ),
        (
            "agent_telemetry_metrics_connections_refused",
            "Connections to /metrics closed to make room: slow to send their request or to read the answer",
            |s| &s.metrics_connections_refused,
        ),
        (
            "agent_telemetry_metrics_connections_timed_out",
            "Connections to /metrics closed because the client was too slow to send or read",
            |s| &s.metrics_connections_timed_out,
        ),
        (
            "agent_telemetry_metrics_requests_malformed",
            "Requests to /metrics that were not valid HTTP/1.1 or had too large a head",
            |s| &s.metrics_requests_malformed,
        ),
        (
            "agent_telemetry_metrics_requests_unauthorized",
            "Requests to /metrics without the configured bearer token",
            |s| &s.metrics_requests_unauthorized,
        ),
        (
            "agent_telemetry_metrics_accept_errors",
            "Failed accepts on the /metrics port, such as running out of file descriptors",
            |s| &s.metrics_accept_errors,
        ),
        (
            "agent_telemetry_metrics_answers_shared",
            "Requests to /metrics sent the latest answer, shared, because the answers being sent held their limit",
            |s| &s.metrics_answers_shared,
        ),
        (
            "agent_telemetry_metrics_requests_coalesced",
            "Requests to /metrics sent the render of a request that waited with them, as fresh as their own",
            |s| &s.metrics_requests_coalesced,
        ),
    ];
    for (name, description, read) in counters {
        let stats = Arc::clone(stats);
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |observer| observer.observe(TelemetryStats::get(read(&stats)), &[]))
            .build();
    }
}
