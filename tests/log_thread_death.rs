//! A log thread that ends unexpectedly: the application's global subscriber, which the log
//! thread's warnings go to, panics on one (an alerting hook that breaks). Nothing is lost
//! silently: every line is written or counted as dropped, and `flush` says the thread is gone.
//! A test binary of its own, since it installs the global default subscriber.

mod support;

use std::io;

use agent_telemetry::{AgentTelemetry, Error, TracesExporter};
use tracing::{Dispatch, Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

#[tracing::instrument(name = "agent_execution")]
fn execute_agent(agent_name: &str, task: &str) {}

/// Breaks on the log thread's warning that it cannot write, after a while: long enough for
/// the test's first flush to be queued before the thread dies.
struct PanicsOnLogWarnings;

impl<S: Subscriber> Layer<S> for PanicsOnLogWarnings {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let metadata = event.metadata();
        let broken = metadata.target() == "agent_telemetry::logs" && *metadata.level() == Level::WARN;
        if broken {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert!(!broken, "the alerting hook broke");
    }
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

#[test]
fn a_log_thread_that_ends_unexpectedly_loses_no_count_and_flush_says_so() {
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(PanicsOnLogWarnings)).unwrap();
    let (layer, telemetry) = AgentTelemetry::builder()
        .ignore_environment()
        .with_metrics_addr(([127, 0, 0, 1], 0))
        .with_traces_exporter(TracesExporter::None)
        .with_log_writer(Unwritable)
        .with_shutdown_timeout(std::time::Duration::from_secs(1))
        .build::<tracing_subscriber::Registry>()
        .unwrap();
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
    let run = |count: usize| {
        tracing::dispatcher::with_default(&dispatch, || {
            (0..count).for_each(|n| execute_agent("a", &format!("task {n}")));
        });
    };
    run(10);
    // Whether the flush reaches the thread before it dies or after, it says so: a flush
    // queued as the thread died is not waited out to a timeout.
    for _ in 0..2 {
        let error = telemetry.flush().unwrap_err();
        assert!(matches!(error, Error::Shutdown { signal: "logs", .. }), "{error:?}");
        assert!(error.to_string().contains("ended unexpectedly"), "{error}");
    }
    run(5);
    let scrape = support::Scrape::parse(&telemetry.metrics().render().unwrap());
    let count = |name: &str| scrape.value(name, &[]).unwrap_or(0.0);
    let (written, dropped) = (
        count("agent_telemetry_log_lines_written_total"),
        count("agent_telemetry_log_lines_dropped_total"),
    );
    assert_eq!((written, dropped), (0.0, 15.0), "every line counted as dropped");
}
