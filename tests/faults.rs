//! A collector that is down, silent or failing costs the agents nothing: they keep their
//! speed, memory stays bounded, every lost span is counted, a warning is logged once, and
//! export resumes when the collector is back. Log and `/metrics` faults too.

mod support;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use agent_telemetry::AgentTelemetryBuilder;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData, SpanExporter};
use support::{free_port, http, Harness, SharedBuffer};
use tracing_subscriber::layer::SubscriberExt;

#[tracing::instrument(name = "agent_execution")]
fn execute_agent(agent_name: &str, task: &str) {}

/// What the telemetry's background threads log (they use the global subscriber).
fn warnings() -> &'static Mutex<Vec<u8>> {
    static CAPTURED: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Arc::new(Mutex::new(Vec::new()));
        let writer = SharedBuffer(Arc::clone(&captured));
        let subscriber =
            tracing_subscriber::registry().with(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(writer));
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        captured
    })
}

/// Fault tests share the captured warnings, so they run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    warnings().lock().unwrap().clear();
    guard
}

/// How often `text` was logged: by the background threads, or on the agents' threads.
fn count_warnings(harness: &Harness, text: &str) -> usize {
    let background = String::from_utf8_lossy(&warnings().lock().unwrap())
        .matches(text)
        .count();
    background + harness.printed_count(text)
}

/// A collector that answers every OTLP request with `status` (changeable while running).
struct FakeCollector {
    port: u16,
    status: Arc<AtomicU16>,
    requests: Arc<AtomicUsize>,
}

impl FakeCollector {
    fn answering(status: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let status = Arc::new(AtomicU16::new(status));
        let requests = Arc::new(AtomicUsize::new(0));
        let (answer, seen) = (Arc::clone(&status), Arc::clone(&requests));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (answer, seen) = (Arc::clone(&answer), Arc::clone(&seen));
                std::thread::spawn(move || serve_otlp(stream, &answer, &seen));
            }
        });
        FakeCollector { port, status, requests }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }
}

fn serve_otlp(mut stream: TcpStream, status: &AtomicU16, requests: &AtomicUsize) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    while support::read_request(&mut stream).is_some() {
        requests.fetch_add(1, Ordering::SeqCst);
        let code = status.load(Ordering::SeqCst);
        let reason = match code {
            200 => "OK",
            429 => "Too Many Requests",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        };
        let response =
            format!("HTTP/1.1 {code} {reason}\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n");
        if stream.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A collector that accepts connections and never answers.
fn silent_collector() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    format!("http://127.0.0.1:{port}/v1/traces")
}

const EXECUTIONS: usize = 3_000;
const QUEUE: usize = 256;
const EXPORT_BATCH: usize = 64;

/// Runs the executions and returns the slowest one, as the agent saw it.
fn run_agents(harness: &Harness) -> Duration {
    harness.run(|| {
        (0..EXECUTIONS)
            .map(|i| {
                let started = Instant::now();
                execute_agent("backend-engineer", &format!("task {i}"));
                started.elapsed()
            })
            .max()
            .unwrap()
    })
}

fn faulty(endpoint: &str) -> Harness {
    Harness::otlp(endpoint, |b| {
        b.with_span_queue_size(QUEUE)
            .with_span_export_batch_size(EXPORT_BATCH)
            .with_span_export_delay(Duration::from_millis(50))
            .with_otlp_timeout(Duration::from_secs(2))
            .with_shutdown_timeout(Duration::from_secs(1))
    })
}

/// The losses the telemetry reports about itself.
fn losses(harness: &Harness) -> (f64, f64, f64) {
    let scrape = harness.scrape();
    let value = |name: &str| scrape.value(name, &[]).unwrap();
    (
        value("agent_telemetry_spans_dropped_total"),
        value("agent_telemetry_spans_export_failed_total"),
        value("agent_telemetry_spans_exported_total"),
    )
}

fn assert_agents_unaffected(endpoint: &str, fault: &str, warning: &str) {
    let mut harness = faulty(endpoint);
    let slowest = run_agents(&harness);
    // An export that blocked the agent would cost it the 2 s export timeout; this bound only
    // catches blocking, not ordinary scheduling noise.
    assert!(
        slowest < Duration::from_millis(500),
        "{fault}: an agent waited {slowest:?}"
    );

    // Everything else keeps working: every execution is counted and logged.
    let scrape = harness.scrape();
    let success = [("agent_name", "backend-engineer"), ("status", "success")];
    assert_eq!(
        scrape.value("agent_executions_total", &success),
        Some(EXECUTIONS as f64),
        "{fault}"
    );
    assert_eq!(harness.log_lines().len(), EXECUTIONS, "{fault}");

    // Spans queue only up to the bound; none is exported.
    std::thread::sleep(Duration::from_millis(300));
    let (dropped, failed, exported) = losses(&harness);
    assert_eq!(exported, 0.0, "{fault}");
    // Spans waiting never exceed the queue. Besides them, the span thread holds the batch it
    // exports and the rest of the thread's batch it was taking (under 64), and the agent's
    // thread the batch still gathering (under 64): what is not held was dropped or failed,
    // and counted.
    let lost = dropped + failed;
    assert!(
        lost >= (EXECUTIONS - QUEUE - EXPORT_BATCH - 2 * 63) as f64,
        "{fault}: memory is bounded, so spans are dropped or fail: dropped {dropped}, failed {failed}"
    );
    assert!(lost <= EXECUTIONS as f64, "{fault}: nothing counted twice");

    // Shutdown with the collector still broken returns within its timeout (1 s) and says so.
    assert_eq!(
        count_warnings(&harness, warning),
        1,
        "{fault}: warned once, not per span"
    );
    // A collector that fails fast may keep the queue from filling: then nothing is dropped.
    assert_eq!(
        count_warnings(&harness, "span export queue (OTEL_BSP_MAX_QUEUE_SIZE)"),
        usize::from(dropped > 0.0),
        "{fault}: the warning names the queue that was full, once, when it was"
    );
    let started = Instant::now();
    let result = harness.running.take().unwrap().shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{fault}: shutdown took {:?}",
        started.elapsed()
    );
    if let Err(error) = result {
        assert!(error.to_string().contains("traces"), "{fault}: {error}");
    }
}

#[test]
fn collector_not_listening() {
    let _serial = serial();
    let endpoint = format!("http://127.0.0.1:{}/v1/traces", free_port());
    assert_agents_unaffected(
        &endpoint,
        "connection refused",
        "queue full on the way to the span exporter",
    );
}

#[test]
fn collector_accepting_but_never_answering() {
    let _serial = serial();
    assert_agents_unaffected(
        &silent_collector(),
        "silent collector",
        "queue full on the way to the span exporter",
    );
}

#[test]
fn collector_answering_errors() {
    for status in [500, 503, 429] {
        let _serial = serial();
        let collector = FakeCollector::answering(status);
        let fault = format!("HTTP {status}");
        assert_agents_unaffected(&collector.endpoint(), &fault, "span export failed");
        assert!(collector.requests.load(Ordering::SeqCst) > 0, "the exporter did try");
    }
}

#[test]
fn export_resumes_when_the_collector_is_back() {
    let _serial = serial();
    let collector = FakeCollector::answering(503);
    let harness = Harness::otlp(&collector.endpoint(), |b| {
        b.with_span_export_delay(Duration::from_millis(50))
            .with_shutdown_timeout(Duration::from_secs(10))
    });
    harness.run(|| (0..50).for_each(|i| execute_agent("a", &format!("{i}"))));
    let deadline = Instant::now() + Duration::from_secs(30);
    while losses(&harness).1 < 50.0 {
        assert!(
            Instant::now() < deadline,
            "the failing export was never counted: {:?}",
            losses(&harness)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    collector.status.store(200, Ordering::SeqCst);
    harness.run(|| (0..50).for_each(|i| execute_agent("a", &format!("{i}"))));
    harness.telemetry().flush().unwrap();
    let (dropped, failed, exported) = losses(&harness);
    assert_eq!((dropped, failed, exported), (0.0, 50.0, 50.0));
    assert_eq!(count_warnings(&harness, "span export failed"), 1);
    assert_eq!(count_warnings(&harness, "span export recovered"), 1);
}

#[test]
fn a_span_exporter_that_panics_loses_its_batch_only() {
    /// The application's exporter, broken for its first batch only.
    #[derive(Debug)]
    struct PanicsOnce(InMemorySpanExporter, AtomicBool);
    impl SpanExporter for PanicsOnce {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let broke_before = self.1.swap(true, Ordering::SeqCst);
            assert!(broke_before, "the exporter broke");
            self.0.export(batch).await
        }
    }
    let _serial = serial();
    let received = InMemorySpanExporter::default();
    // No timed export: each batch is the one a flush sends.
    let harness = Harness::with(|b| {
        b.with_span_exporter(PanicsOnce(received.clone(), AtomicBool::new(false)))
            .with_span_export_delay(Duration::from_secs(3600))
    });
    harness.run(|| execute_agent("a", "broken batch"));
    assert!(harness.telemetry().flush().is_err(), "the broken batch fails its flush");
    harness.run(|| execute_agent("a", "next batch"));
    harness.telemetry().flush().expect("the export thread lived on");
    let spans = received.get_finished_spans().unwrap();
    let tasks: Vec<String> = spans
        .iter()
        .flat_map(|span| &span.attributes)
        .filter(|kv| kv.key.as_str() == "task")
        .map(|kv| kv.value.as_str().into_owned())
        .collect();
    assert_eq!(tasks, ["next batch"]);
    assert_eq!(losses(&harness), (0.0, 1.0, 1.0), "(dropped, failed, exported)");
    assert_eq!(count_warnings(&harness, "span export failed; lost spans"), 1);
    assert!(count_warnings(&harness, "the span exporter panicked: the exporter broke") >= 1);
}

#[test]
fn a_span_exporter_that_fails_to_shut_down_is_reported() {
    /// Panics in the shutdown the span processor calls, which an exporter may implement alone.
    #[derive(Debug)]
    struct PanicsOnShutdown(InMemorySpanExporter);
    impl SpanExporter for PanicsOnShutdown {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.export(batch).await
        }
        fn shutdown(&self) -> OTelSdkResult {
            panic!("the exporter could not close");
        }
    }
    /// Fails in the shutdown with a timeout, which the other one calls by default.
    #[derive(Debug)]
    struct FailsToShutDown(InMemorySpanExporter);
    impl SpanExporter for FailsToShutDown {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.export(batch).await
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Err(OTelSdkError::InternalFailure("the socket would not close".into()))
        }
    }
    type Configure = fn(AgentTelemetryBuilder, InMemorySpanExporter) -> AgentTelemetryBuilder;
    let cases: [(&str, Configure, &str); 2] = [
        (
            "panics",
            |builder, received| builder.with_span_exporter(PanicsOnShutdown(received)),
            "the span exporter panicked: the exporter could not close",
        ),
        (
            "fails",
            |builder, received| builder.with_span_exporter(FailsToShutDown(received)),
            "the socket would not close",
        ),
    ];
    for (case, configure, error) in cases {
        let _serial = serial();
        let received = InMemorySpanExporter::default();
        let mut harness = Harness::with(|builder| configure(builder, received.clone()));
        harness.run(|| execute_agent("a", "last span"));
        // The spans were exported before the exporter's shutdown failed, so shutdown succeeds;
        // the failure is warned about.
        harness
            .running
            .take()
            .unwrap()
            .shutdown()
            .expect("every span was exported");
        assert_eq!(received.get_finished_spans().unwrap().len(), 1, "{case}: flushed first");
        let warning = "the span exporter failed to shut down, after the final export";
        assert_eq!(count_warnings(&harness, warning), 1, "{case}");
        assert_eq!(
            count_warnings(&harness, error),
            1,
            "{case}: the warning carries the error"
        );
    }
}

#[test]
fn log_dir_removed_or_blocked_while_running() {
    let _serial = serial();
    let harness = Harness::with(|b| b);
    let dir = harness.dir.path().to_owned();
    harness.run(|| (0..10).for_each(|i| execute_agent("a", &format!("before {i}"))));
    harness.telemetry().flush().unwrap();

    // Removed: the directory and today's file come back, nothing is lost.
    std::fs::remove_dir_all(&dir).unwrap();
    harness.run(|| (0..10).for_each(|i| execute_agent("a", &format!("after {i}"))));
    let lines = harness.log_lines();
    assert_eq!(lines.len(), 10, "the lines after the removal are in the recreated file");
    assert!(lines[0].contains("after 0"));

    // Blocked (a file where the directory was): lines are dropped and counted, and metrics
    // and traces go on.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    harness.run(|| (0..10).for_each(|i| execute_agent("a", &format!("blocked {i}"))));
    harness.telemetry().flush().unwrap();
    let scrape = harness.scrape();
    assert_eq!(scrape.value("agent_telemetry_log_lines_dropped_total", &[]), Some(10.0));
    assert!(scrape.value("agent_telemetry_log_write_errors_total", &[]).unwrap() >= 1.0);
    let success = [("agent_name", "a"), ("status", "success")];
    assert_eq!(scrape.value("agent_executions_total", &success), Some(30.0));
    assert_eq!(harness.spans().len(), 30);
    assert_eq!(count_warnings(&harness, "cannot write agent execution log lines"), 1);
    assert_eq!(count_warnings(&harness, "log writing recovered"), 0);

    // Unblocked: writing resumes by itself, and says so once.
    std::fs::remove_file(&dir).unwrap();
    harness.run(|| (0..10).for_each(|i| execute_agent("a", &format!("unblocked {i}"))));
    let lines = harness.log_lines();
    assert_eq!(lines.len(), 10, "the lines after the block was lifted");
    assert!(lines[0].contains("unblocked 0"));
    assert_eq!(count_warnings(&harness, "log writing recovered"), 1);
    assert_eq!(
        harness.scrape().value("agent_telemetry_log_lines_dropped_total", &[]),
        Some(10.0),
        "only the blocked lines were lost"
    );
}

#[test]
fn slow_and_malformed_metrics_clients_cannot_stall_the_server() {
    let _serial = serial();
    let harness = Harness::new();
    let addr = harness.telemetry().metrics_addr().unwrap();
    // Half a request, held open; garbage; a client that sends a request and never reads.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /metr").unwrap();
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(b"\x00\x01\x02 nonsense \xff\r\n\r\n").unwrap();
    let mut deaf = TcpStream::connect(addr).unwrap();
    deaf.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    for _ in 0..5 {
        let (status, body) = http(addr, "GET", "/metrics");
        assert_eq!(status, 200);
        assert!(body.contains("framework_info"));
    }
    drop((slow, garbage, deaf));
}
