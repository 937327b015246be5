//! Soak: 20,000 agent executions per second for 60 s with every signal on, exporting over
//! OTLP/HTTP to a local receiver, at default settings. Prints what was dropped (nothing is
//! the target) and the resident set size every 5 s (flat is the target), then whether each
//! target was met.
//!
//! `cargo bench --bench soak` (`-- --seconds N --rate R` to change the run). The receiver is
//! a minimal OTLP/HTTP endpoint on 127.0.0.1 that reads each request and answers 200, so the
//! run measures this crate and its exporter, not a collector's storage.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_telemetry::AgentTelemetry;
use tracing_subscriber::layer::SubscriberExt;

#[tracing::instrument(name = "agent_execution")]
fn execute_agent(agent_name: &str, task: &str) {}

/// Answers every OTLP/HTTP export with 200 and counts the bytes it received.
fn local_receiver() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
    let port = listener.local_addr().expect("bound").port();
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || serve(stream, &counter));
        }
    });
    (format!("http://127.0.0.1:{port}/v1/traces"), received)
}

fn serve(stream: TcpStream, received: &AtomicU64) {
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        received.fetch_add(length as u64, Ordering::Relaxed);
        let answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
        if writer.write_all(answer).is_err() {
            return;
        }
    }
}

fn argument(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mib() -> f64 {
    memory_stats::memory_stats().map_or(0.0, |m| m.physical_mem as f64 / (1024.0 * 1024.0))
}

fn main() {
    let seconds = argument("--seconds", 60.0);
    let rate = argument("--rate", 20_000.0);
    let (endpoint, received) = local_receiver();
    let logs = tempfile::tempdir().expect("temp dir");
    let (layer, guard) = AgentTelemetry::builder()
        .ignore_environment()
        .with_metrics_addr("127.0.0.1:0".parse().expect("address"))
        .with_log_dir(logs.path())
        .with_otlp_endpoint(endpoint)
        .build()
        .expect("telemetry");
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
    let total = (seconds * rate) as u64;
    println!("soak: {total} executions at {rate}/s for {seconds} s, default settings, OTLP/HTTP to a local receiver");

    let started = Instant::now();
    let mut next_report = Duration::from_secs(5);
    let mut resident = Vec::new();
    tracing::dispatcher::with_default(&dispatch, || {
        for i in 0..total {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            execute_agent("backend-engineer", "Implement API");
            if started.elapsed() >= next_report {
                let rss = rss_mib();
                resident.push(rss);
                println!(
                    "  {:>5.1} s  rss {:>7.1} MiB  {} executions",
                    started.elapsed().as_secs_f64(),
                    rss,
                    i + 1
                );
                next_report += Duration::from_secs(5);
            }
        }
    });
    let produced = started.elapsed();
    guard.flush().expect("flush");
    let metrics = guard.metrics().render().expect("metrics");
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(f64::NAN)
    };
    println!(
        "soak: produced in {produced:.1?} ({:.0}/s achieved)",
        total as f64 / produced.as_secs_f64()
    );
    let (spans_dropped, lines_dropped) = (
        value("agent_telemetry_spans_dropped_total"),
        value("agent_telemetry_log_lines_dropped_total"),
    );
    println!(
        "soak: spans exported {} dropped {spans_dropped} failed {}; log lines written {} dropped {lines_dropped}; receiver got {} MiB",
        value("agent_telemetry_spans_exported_total"),
        value("agent_telemetry_spans_export_failed_total"),
        value("agent_telemetry_log_lines_written_total"),
        received.load(Ordering::Relaxed) / (1024 * 1024),
    );
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "soak targets: no span or log line dropped: {}; resident memory flat: {}",
        verdict(spans_dropped == 0.0 && lines_dropped == 0.0),
        flatness(&resident).map_or_else(
            || "not measured (run for 15 s or more)".to_owned(),
            |(first, last)| format!(
                "{} ({first:.1} -> {last:.1} MiB, the means of the first and second half after the first 5 s; \
                 target: within {FLAT_MIB} MiB)",
                verdict(last - first <= FLAT_MIB)
            ),
        ),
    );
    guard.shutdown().expect("shutdown");
}

/// How far the resident set may rise from the soak's first half to its second and count as
/// flat: a leak of a byte per execution adds 1.2 MiB a minute at 20,000/s.
const FLAT_MIB: f64 = 1.0;

/// The mean resident set of the first and of the second half of the readings, leaving out
/// the first (taken while the queues and buffers are still being set up); `None` with fewer
/// than three readings.
fn flatness(readings: &[f64]) -> Option<(f64, f64)> {
    let settled = readings.get(1..).filter(|settled| settled.len() >= 2)?;
    let (first, last) = settled.split_at(settled.len() / 2);
    let mean = |half: &[f64]| half.iter().sum::<f64>() / half.len() as f64;
    Some((mean(first), mean(last)))
}
