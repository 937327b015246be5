//! Runs the main job, `examples/agents.rs`, for a few seconds against a real Phoenix and
//! checks its three outputs: the scraped `/metrics`, its log files, and the received spans.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::phoenix::Phoenix;
use support::{example_binary, http, json_pairs, Scrape};

#[test]
fn the_main_job_produces_all_three_signals() {
    let phoenix = Phoenix::start();
    let work = tempfile::tempdir().unwrap();
    let mut child = against_phoenix(
        &example_binary(),
        &["--duration", "120", "--rate", "25"],
        work.path(),
        phoenix.as_ref(),
    );

    // It says where each signal goes.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    while !banner.contains("traces:") {
        assert_ne!(
            stdout.read_line(&mut banner).unwrap(),
            0,
            "example exited early: {banner}"
        );
    }
    assert!(
        banner.contains("logs:    logs/my-name-is-claude.YYYY-MM-DD.log"),
        "{banner}"
    );
    let addr = metrics_addr(&banner);

    // Several seconds of work, then a scrape of the real endpoint.
    std::thread::sleep(Duration::from_secs(5));
    let (status, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200);
    let scrape = Scrape::parse(&body);
    for family in [
        "agent_executions_total",
        "agent_execution_duration_seconds",
        "framework_memory_usage_bytes",
        "framework_info",
    ] {
        assert!(scrape.types.contains_key(family), "{family} missing:\n{body}");
    }
    assert!(scrape.sum("agent_executions_total") >= 20.0, "25/s for 5 s:\n{body}");
    let info = [
        ("environment", "production"),
        ("scale", "enterprise"),
        ("version", "3.3.0"),
    ];
    assert_eq!(scrape.value("framework_info", &info), Some(1.0));
    if let Some((clean, report)) = support::promtool_check_metrics(&body) {
        assert!(clean, "promtool check metrics:\n{report}");
    }

    // SIGTERM: running agents are cancelled, everything is flushed, exit code 0.
    let terminated = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let exit = wait_for_exit(&mut child, Duration::from_secs(30), "within 30 s of SIGTERM");
    assert!(exit.success(), "exit status {exit}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(rest.contains("flushed"), "{rest}");

    // One valid contract line per execution.
    let lines = support::read_log_lines(&work.path().join("logs"));
    assert!(
        lines.len() as f64 >= scrape.sum("agent_executions_total"),
        "lines only grow after the scrape"
    );
    let mut logged = BTreeSet::new();
    for line in &lines {
        let pairs = json_pairs(line);
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(&keys[..8], &support::LOG_LINE_KEYS[..8]);
        assert!(pairs[6].1.is_f64() && pairs[7].1.is_string(), "{line}");
        if phoenix.is_some() {
            let id = |key: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str().unwrap().to_owned())
            };
            logged.insert((id("trace.id").expect("trace.id"), id("span.id").expect("span.id")));
        }
    }

    // Every execution reached the receiver, as an AGENT span with the guide's attributes,
    // under the ids its log line carries.
    let Some(phoenix) = phoenix else { return };
    // Beside the agents' spans, their model calls' LLM spans.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (spans, calls) = loop {
        let (agents, others): (Vec<serde_json::Value>, Vec<serde_json::Value>) = phoenix
            .spans()
            .into_iter()
            .partition(|span| span["span_kind"] == "AGENT");
        if agents.len() >= lines.len() || Instant::now() > deadline {
            break (agents, others);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(spans.len(), lines.len(), "every span arrives, none twice");
    assert!(!calls.is_empty(), "the agents' model calls arrive");
    for call in &calls {
        assert_eq!(call["span_kind"], "LLM", "{call}");
        assert!(
            spans
                .iter()
                .any(|agent| agent["context"]["span_id"] == call["parent_id"]),
            "a model call under its agent: {call}"
        );
    }
    let received: BTreeSet<(String, String)> = spans
        .iter()
        .map(|s| {
            (
                s["context"]["trace_id"].as_str().unwrap().to_owned(),
                s["context"]["span_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        received, logged,
        "trace.id and span.id of each log line name a received span"
    );
    for span in &spans {
        assert_eq!(span["name"], "agent_execution");
        assert_eq!(span["span_kind"], "AGENT", "{span}");
        let attributes = &span["attributes"];
        for key in ["agent.name", "task", "result.status", "gen_ai.agent.name"] {
            assert!(attributes[key].is_string(), "{key} in {span}");
        }
        assert_eq!(attributes["gen_ai.operation.name"], "invoke_agent");
        // Failed, or cancelled (agents running when the example stops).
        let failed = attributes["result.status"] != "success";
        assert_eq!(span["status_code"] == "ERROR", failed, "{span}");
        assert_eq!(attributes["error.type"].is_string(), failed, "{span}");
    }
    assert!(
        spans.iter().any(|s| !s["parent_id"].is_null()),
        "leads delegate: some spans have parents"
    );
}

/// The agents' work decides the main job's exit code, not telemetry: with no collector to flush
/// to at shutdown it warns and exits 0.
#[test]
fn the_main_job_exits_zero_with_a_warning_when_the_collector_is_gone() {
    let work = tempfile::tempdir().unwrap();
    let gone = format!("http://127.0.0.1:{}", support::free_port());
    let output = Command::new(example_binary())
        .args(["--duration", "2", "--rate", "10"])
        .current_dir(work.path())
        .env("AGENT_TELEMETRY_METRICS_ADDR", "127.0.0.1:0")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &gone)
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "500")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the example");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit status {}:\n{stderr}", output.status);
    assert!(
        stderr.contains("agents: stopped; warning: telemetry not fully flushed"),
        "{stderr}"
    );
    assert!(
        !support::read_log_lines(&work.path().join("logs")).is_empty(),
        "the log lines were still written"
    );
}

/// Runs the async example, `examples/async_agents.rs`, against a real Phoenix, scrapes it once
/// every execution has ended, and checks that the three signals agree on every agent's
/// executions by status: timeouts and lost races `cancelled`, panics failures of type `panic`.
#[test]
fn the_async_example_agrees_in_all_three_signals() {
    let phoenix = Phoenix::start();
    let work = tempfile::tempdir().unwrap();
    let mut child = against_phoenix(
        &support::example_binary_named("async_agents"),
        &["--duration", "6", "--rate", "30", "--linger", "3"],
        work.path(),
        phoenix.as_ref(),
    );
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut said = String::new();
    while !said.contains("every execution has ended") {
        assert_ne!(stdout.read_line(&mut said).unwrap(), 0, "exited early: {said}");
    }
    let addr = metrics_addr(&said);
    let (status, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200);
    let exit = wait_for_exit(&mut child, Duration::from_secs(60), "after its run");
    assert!(exit.success(), "exit status {exit}");

    // (agent_name, status) -> executions, per signal.
    type Tally = std::collections::BTreeMap<(String, String), u64>;
    let mut counted = Tally::new();
    for sample in Scrape::parse(&body).with_name("agent_executions_total") {
        let key = (sample.labels["agent_name"].clone(), sample.labels["status"].clone());
        *counted.entry(key).or_default() += sample.value as u64;
    }
    let lines = support::read_log_lines(&work.path().join("logs"));
    let mut logged = Tally::new();
    let mut error_types = BTreeSet::new();
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (
            value["agent_name"].as_str().unwrap().to_owned(),
            value["status"].as_str().unwrap().to_owned(),
        );
        *logged.entry(key).or_default() += 1;
        if let Some(error_type) = value["error.type"].as_str() {
            error_types.insert(error_type.to_owned());
        }
    }
    assert_eq!(counted, logged, "the counters and the log lines agree");
    let statuses: BTreeSet<&str> = logged.keys().map(|(_, status)| status.as_str()).collect();
    assert!(statuses.contains("cancelled"), "timeouts and lost races: {logged:?}");
    assert!(error_types.contains("cancelled"), "{error_types:?}");

    let Some(phoenix) = phoenix else { return };
    let spans = phoenix.wait_for_spans(lines.len(), Duration::from_secs(60));
    let mut traced = Tally::new();
    for span in &spans {
        let attributes = &span["attributes"];
        let key = (
            attributes["agent.name"].as_str().unwrap().to_owned(),
            attributes["result.status"].as_str().unwrap().to_owned(),
        );
        *traced.entry(key).or_default() += 1;
        let cancelled = attributes["result.status"] == "cancelled";
        if cancelled {
            assert_eq!(span["status_code"], "ERROR", "{span}");
            assert_eq!(attributes["error.type"], "cancelled", "{span}");
        }
    }
    assert_eq!(traced, logged, "the spans Phoenix received and the log lines agree");
}

/// The `/metrics` address an example printed as `metrics: http://ADDR/metrics`.
/// Starts an example with `args` in `work`, its `/metrics` on a free port, its stdout piped,
/// sending spans to `phoenix` every 200 ms (none without one).
fn against_phoenix(binary: &Path, args: &[&str], work: &Path, phoenix: Option<&Phoenix>) -> Child {
    let mut command = Command::new(binary);
    command
        .args(args)
        .current_dir(work)
        .env("AGENT_TELEMETRY_METRICS_ADDR", "127.0.0.1:0")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    match phoenix {
        Some(phoenix) => command.env("OTEL_EXPORTER_OTLP_ENDPOINT", phoenix.otlp_http_endpoint()),
        None => command.env("OTEL_TRACES_EXPORTER", "none"),
    };
    command
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()))
}

fn metrics_addr(printed: &str) -> SocketAddr {
    printed
        .lines()
        .find_map(|l| l.strip_prefix("metrics: http://")?.strip_suffix("/metrics"))
        .expect("metrics line")
        .parse()
        .unwrap()
}

/// Waits for `child` to exit, failing the test if it has not within `limit`.
fn wait_for_exit(child: &mut Child, limit: Duration, when: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            return exit;
        }
        assert!(Instant::now() < deadline, "the example did not stop {when}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
