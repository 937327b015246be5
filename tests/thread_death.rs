//! A background thread that ends unexpectedly: the application's global subscriber, which the
//! log and span threads' warnings go to, panics on one (an alerting hook that breaks). Nothing
//! is lost silently: every line and span is delivered or counted as dropped, and `flush` and
//! `shutdown` say the thread is gone, without waiting out their timeout. A test binary of its
//! own, since it installs the global default subscriber.

mod support;

use std::io;
use std::sync::Once;
use std::time::{Duration, Instant};

use agent_telemetry::{AgentTelemetry, AgentTelemetryBuilder, Error, TracesExporter};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tracing::{Dispatch, Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

#[tracing::instrument(name = "agent_execution")]
fn execute_agent(agent_name: &str, task: &str) {}

/// Breaks on a warning of `agent_telemetry::logs` or `agent_telemetry::traces`, after a
/// while: long enough for the test's first flush to be queued before the thread dies.
struct PanicsOnWarnings;

impl<S: Subscriber> Layer<S> for PanicsOnWarnings {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let metadata = event.metadata();
        let broken = ["agent_telemetry::logs", "agent_telemetry::traces"].contains(&metadata.target())
            && *metadata.level() == Level::WARN;
        if broken {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(!broken, "the alerting hook broke");
    }
}

fn install_the_alerting_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(PanicsOnWarnings)).unwrap();
    });
}

/// A destination that refuses every write: the log thread warns.
struct Unwritable;

impl io::Write for Unwritable {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("No space left on device"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A collector that refuses every export: the span thread warns.
#[derive(Debug)]
struct Refusing;

impl SpanExporter for Refusing {
    async fn export(&self, _: Vec<SpanData>) -> OTelSdkResult {
        Err(OTelSdkError::InternalFailure("503 Service Unavailable".into()))
    }
}

/// Builds telemetry with `setup` and a one-second timeout (the alerting hook installed),
/// makes 10 agent executions, which kill `signal`'s thread, then 5 more, and returns the two
/// `counters` as scraped. Every flush and the shutdown must say the thread ended
/// unexpectedly, well before the timeout: whether a flush reaches the thread before it dies
/// or after, a flush queued as the thread died is not waited out.
fn executions_past_a_thread_death(
    signal: &str,
    setup: impl FnOnce(AgentTelemetryBuilder) -> AgentTelemetryBuilder,
    counters: [&str; 2],
) -> [f64; 2] {
    install_the_alerting_hook();
    let builder = AgentTelemetry::builder()
        .ignore_environment()
        .with_metrics_addr(([127, 0, 0, 1], 0))
        .with_shutdown_timeout(Duration::from_secs(1));
    let (layer, telemetry) = setup(builder).build::<tracing_subscriber::Registry>().unwrap();
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
    let run = |count: usize| {
        tracing::dispatcher::with_default(&dispatch, || {
            (0..count).for_each(|n| execute_agent("a", &format!("task {n}")));
        });
    };
    run(10);
    for _ in 0..2 {
        let asked = Instant::now();
        assert_ended_unexpectedly(telemetry.flush(), signal, asked);
    }
    run(5);
    let scrape = support::Scrape::parse(&telemetry.metrics().render().unwrap());
    let counted = counters.map(|name| scrape.value(name, &[]).unwrap_or(0.0));
    let asked = Instant::now();
    assert_ended_unexpectedly(telemetry.shutdown(), signal, asked);
    counted
}

/// Asserts that `result` says `signal`'s thread ended unexpectedly, and came well before the
/// one-second timeout.
fn assert_ended_unexpectedly(result: agent_telemetry::Result<()>, signal: &str, asked: Instant) {
    let error = result.unwrap_err();
    assert!(
        matches!(&error, Error::Shutdown { signal: s, .. } if *s == signal),
        "{error:?}"
    );
    assert!(error.to_string().contains("ended unexpectedly"), "{error}");
    assert!(
        asked.elapsed() < Duration::from_millis(900),
        "answered after {:?}",
        asked.elapsed()
    );
}

#[test]
fn a_log_thread_that_ends_unexpectedly_loses_no_count_and_flush_says_so() {
    let [written, dropped] = executions_past_a_thread_death(
        "logs",
        |b| b.with_traces_exporter(TracesExporter::None).with_log_writer(Unwritable),
        [
            "agent_telemetry_log_lines_written_total",
            "agent_telemetry_log_lines_dropped_total",
        ],
    );
    assert_eq!((written, dropped), (0.0, 15.0), "every line counted as dropped");
}

#[test]
fn a_span_thread_that_ends_unexpectedly_loses_no_count_and_flush_says_so() {
    let [failed, dropped] = executions_past_a_thread_death(
        "traces",
        |b| b.with_span_exporter(Refusing).with_log_writer(io::sink()),
        [
            "agent_telemetry_spans_export_failed_total",
            "agent_telemetry_spans_dropped_total",
        ],
    );
    assert_eq!(
        failed + dropped,
        15.0,
        "every span counted: {failed} failed, {dropped} dropped"
    );
    assert_eq!(dropped, 5.0, "the spans after the thread ended are dropped");
}
