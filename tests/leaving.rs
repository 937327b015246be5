//! What leaves the process: credentials never printed, headers sent exactly as configured,
//! nonsense refused, every signal bounded in bytes, log files never through a symlink and
//! never world-readable, secrets scrubbed from every signal, and the task captured as asked.
//! Each test reads the real outputs: the collector's requests, the log file's bytes, the
//! exported spans, the scraped `/metrics`.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use agent_telemetry::propagation::continue_trace;
use agent_telemetry::{AgentTelemetry, Scrubbing, TaskCapture, TracesExporter};
use opentelemetry_sdk::trace::SpanData;
use proptest::prelude::*;
use support::{ExampleProcess, Harness, RecordingCollector};

#[tracing::instrument(name = "agent_execution", err)]
fn execute_agent(agent_name: &str, task: &str, error: Option<&str>) -> Result<(), String> {
    match error {
        Some(error) => Err(error.to_owned()),
        None => Ok(()),
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// The value of `key` in a JSON log line.
fn field(line: &str, key: &str) -> Option<serde_json::Value> {
    support::json_pairs(line)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// The header `name` of a request head, if sent.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

// ---------------------------------------------------------------------------------------------
// Credentials and headers

#[test]
fn user_info_is_sent_as_basic_auth_and_never_printed() {
    let collector = RecordingCollector::start();
    let endpoint = format!("http://agent:hunter2@{}", collector.addr);
    let process = ExampleProcess::start(
        &["--rate", "50"],
        &[
            ("OTEL_TRACES_EXPORTER", "otlp"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        None,
    );
    assert!(
        process.banner.contains(&format!(
            "traces:  OTLP/HTTP to http://[REDACTED]@{}/v1/traces",
            collector.addr
        )),
        "{}",
        process.banner
    );
    let requests = collector.wait_for(1, Duration::from_secs(20));
    let (head, _) = requests.first().expect("an export arrived");
    assert!(head.starts_with("POST /v1/traces HTTP/1.1\r\n"), "{head}");
    // base64("agent:hunter2")
    assert_eq!(header(head, "authorization"), Some("Basic YWdlbnQ6aHVudGVyMg=="));
    assert!(!process.banner.contains("hunter2") && !process.stderr().contains("hunter2"));
}

#[test]
fn header_variables_are_parsed_checked_and_sent_exactly() {
    let collector = RecordingCollector::start();
    let process = ExampleProcess::start(
        &["--rate", "50"],
        &[
            ("OTEL_TRACES_EXPORTER", "otlp"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{}", collector.addr)),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=k%20ey%2C1 , X-Tenant=acme"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        None,
    );
    let requests = collector.wait_for(1, Duration::from_secs(20));
    let (head, _) = requests.first().expect("an export arrived");
    assert_eq!(header(head, "x-api-key"), Some("k ey,1"), "percent-decoded: {head}");
    assert_eq!(header(head, "x-tenant"), Some("acme"));
    assert!(!process.stderr().contains("k ey"));

    // Malformed: the application does not start, and says which variable, not the value.
    for bad in ["garbage", "=hunter2", "bad key=hunter2", "k=hunter2%0D%0Ax: y"] {
        let output = Command::new(support::example_binary())
            .args(["--duration", "1"])
            .env("AGENT_TELEMETRY_METRICS_ADDR", "off")
            .env("OTEL_EXPORTER_OTLP_HEADERS", bad)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{bad:?} was accepted");
        assert!(stderr.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{bad:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{bad:?}: {stderr}");
    }
}

#[test]
fn nonsense_in_the_environment_stops_the_start_naming_the_variable() {
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "99999999"),
        ("OTEL_RESOURCE_ATTRIBUTES", "service.name="),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://user:hunter2@host:port"),
        ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "0"),
        ("AGENT_TELEMETRY_SCRUBBING", "maybe"),
        ("AGENT_TELEMETRY_TASK_CAPTURE", "some"),
        // Credentials that do not parse as such: never printed.
        ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization: Basic hunter2aHVudGVy="),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://agent:hunter2#x@collector:4318"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://agent:hunter2/x@collector:4318"),
    ] {
        let output = Command::new(support::example_binary())
            .args(["--duration", "1"])
            .env("AGENT_TELEMETRY_METRICS_ADDR", "off")
            .env(name, value)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}={value} was accepted");
        assert!(stderr.contains(name), "{name}={value}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
}

/// Runs the example for a second with `env`; its stderr, or a panic when it took a minute.
fn example_within_a_minute(env: &[(&str, std::ffi::OsString)]) -> (bool, String) {
    use std::io::Read;
    let mut child = Command::new(support::example_binary())
        .args(["--duration", "1"])
        .env("AGENT_TELEMETRY_METRICS_ADDR", "127.0.0.1:0")
        .env("OTEL_TRACES_EXPORTER", "none")
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{env:?}: the start hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status.success(), stderr)
}

#[cfg(unix)]
#[test]
fn a_file_the_environment_names_that_is_not_regular_stops_the_start_at_once() {
    let work = tempfile::tempdir().unwrap();
    let fifo = |name: &str| {
        let path = work.path().join(name);
        assert!(Command::new("mkfifo").arg(&path).status().unwrap().success());
        path.into_os_string()
    };
    let logs = work.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let today = time::OffsetDateTime::now_utc().date();
    for day in [today, today.next_day().unwrap()] {
        let name = format!(
            "my-name-is-claude.{:04}-{:02}-{:02}.log",
            day.year(),
            u8::from(day.month()),
            day.day()
        );
        fifo(&format!("logs/{name}"));
    }
    // A FIFO without a writer, or a file that never ends: each would hold the start.
    for (name, value) in [
        ("AGENT_TELEMETRY_METRICS_TOKEN_FILE", fifo("token-fifo")),
        ("AGENT_TELEMETRY_METRICS_TOKEN_FILE", "/dev/zero".into()),
        ("AGENT_TELEMETRY_PRICES", fifo("prices-fifo")),
        ("AGENT_TELEMETRY_LOG_DIR", logs.into_os_string()),
    ] {
        let (success, stderr) = example_within_a_minute(&[(name, value.clone())]);
        assert!(!success, "{name}={value:?} was accepted");
        assert!(stderr.contains(name), "{name}={value:?}: {stderr}");
    }
}

#[cfg(unix)]
#[test]
fn a_blank_variable_whose_default_is_less_guarded_stops_the_start() {
    // Taken for unset: /metrics open to anyone, on every interface, and tasks in full.
    for name in [
        "AGENT_TELEMETRY_METRICS_TOKEN_FILE",
        "AGENT_TELEMETRY_METRICS_ADDR",
        "AGENT_TELEMETRY_TASK_CAPTURE",
    ] {
        for blank in ["", " "] {
            let (success, stderr) = example_within_a_minute(&[(name, blank.into())]);
            assert!(!success, "{name}={blank:?} was taken for unset");
            assert!(stderr.contains(name) && stderr.contains("set but empty"), "{stderr}");
        }
    }
}

#[test]
fn a_value_that_is_not_utf8_stops_the_start_naming_the_variable() {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let work = tempfile::tempdir().unwrap();
    // A token file at a path that is not UTF-8: left unread, /metrics would be open to anyone.
    let mut token = work.path().join("token-").into_os_string().into_vec();
    token.push(0xff);
    std::fs::write(std::ffi::OsStr::from_bytes(&token), "s3cret-token\n").unwrap();
    for (name, value) in [
        ("AGENT_TELEMETRY_METRICS_TOKEN_FILE", token),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", b"\xff\xfe".to_vec()),
    ] {
        let value = std::ffi::OsString::from_vec(value);
        let (success, stderr) = example_within_a_minute(&[(name, value.clone())]);
        assert!(!success, "{name}={value:?} was accepted");
        assert!(
            stderr.contains(name) && stderr.contains("not valid UTF-8"),
            "{name}={value:?}: {stderr}"
        );
    }
}

#[cfg(unix)]
#[test]
fn a_rust_log_field_filter_is_matched_as_text_not_compiled() {
    // As a regular expression, `[ab]*a[ab][ab]…` needs a DFA of 2^24 states.
    let exponential = format!("info,[{{x=[ab]*a{}}}]=debug", "[ab]".repeat(24));
    let (success, stderr) = example_within_a_minute(&[("RUST_LOG", exponential.into())]);
    assert!(success, "{stderr}");
}

/// Set by the parent for the child run of
/// `ignore_environment_ignores_the_header_variables_child`: the collector's URL.
const CHILD_COLLECTOR: &str = "AGENT_TELEMETRY_TEST_COLLECTOR";

#[test]
fn ignore_environment_ignores_the_header_variables() {
    let collector = RecordingCollector::start();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "ignore_environment_ignores_the_header_variables_child",
            "--nocapture",
        ])
        .env(CHILD_COLLECTOR, collector.traces_url())
        .env("OTEL_EXPORTER_OTLP_HEADERS", "x-from-env=1")
        .env("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-traces-from-env=1")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        .status()
        .unwrap();
    assert!(status.success());
    let requests = collector.wait_for(1, Duration::from_secs(20));
    let (head, _) = requests.first().expect("the child exported to the builder's endpoint");
    assert_eq!(header(head, "x-from-builder"), Some("1"), "{head}");
    assert_eq!(header(head, "x-from-env"), None, "{head}");
    assert_eq!(header(head, "x-traces-from-env"), None, "{head}");
}

/// The child of `ignore_environment_ignores_the_header_variables`; does nothing on its own.
#[test]
fn ignore_environment_ignores_the_header_variables_child() {
    let Ok(collector) = std::env::var(CHILD_COLLECTOR) else {
        return;
    };
    let (layer, guard) = AgentTelemetry::builder()
        .ignore_environment()
        .without_metrics_server()
        .with_otlp_endpoint(collector)
        .with_otlp_header("x-from-builder", "1")
        .build::<tracing_subscriber::Registry>()
        .unwrap();
    use tracing_subscriber::layer::SubscriberExt;
    tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
        execute_agent("a", "t", None).unwrap();
    });
    guard.shutdown().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Bounded in bytes

#[test]
fn label_values_are_cut_before_the_cardinality_cap_sees_them() {
    let harness = Harness::with(|b| b.with_max_agent_names(2));
    let base = "n".repeat(300);
    harness.run(|| {
        for suffix in ["a", "b", "c"] {
            execute_agent(&format!("{base}{suffix}{}", "x".repeat(1 << 20)), "t", None).unwrap();
        }
    });
    let scrape = harness.scrape();
    let kept = format!("{}…", "n".repeat(256));
    let success = [("agent_name", kept.as_str()), ("status", "success")];
    assert_eq!(scrape.value("agent_executions_total", &success), Some(3.0));
    assert_eq!(
        scrape.value("agent_telemetry_agent_names_overflowed_total", &[]),
        Some(0.0)
    );
    assert!(scrape.text.len() < 64 * 1024, "{} bytes", scrape.text.len());
    let line = &harness.log_lines()[0];
    assert_eq!(field(line, "agent_name").unwrap(), kept.as_str());
    assert_eq!(
        attribute(&harness.spans()[0], "agent.name").as_deref(),
        Some(kept.as_str())
    );
}

#[test]
fn span_attributes_are_cut_at_the_attribute_limit() {
    let harness = Harness::with(|b| b.with_max_task_chars(100).with_attribute_value_length_limit(50));
    let long = "y".repeat(1 << 20);
    harness.run(|| {
        tracing::info_span!(
            "agent_execution",
            agent_name = "a",
            task = long.as_str(),
            prompt = long.as_str()
        )
        .in_scope(|| tracing::error!(details = long.as_str(), "{}", "z".repeat(1000)));
    });
    let spans = harness.spans();
    let span = &spans[0];
    let cut = |c: &str, n: usize| format!("{}…", c.repeat(n));
    assert_eq!(attribute(span, "task"), Some(cut("y", 50)));
    assert_eq!(attribute(span, "prompt"), Some(cut("y", 50)));
    let event = &span.events.events[0];
    assert_eq!(event.name, cut("z", 50));
    let details = event.attributes.iter().find(|kv| kv.key.as_str() == "details").unwrap();
    assert_eq!(details.value.as_str(), cut("y", 50));
    // The log line keeps the task to its own limit, and the error text too.
    let line = &harness.log_lines()[0];
    assert_eq!(field(line, "task").unwrap(), cut("y", 100).as_str());
    assert_eq!(field(line, "error.message").unwrap(), cut("z", 100).as_str());
}

#[test]
fn an_export_request_never_passes_its_byte_limit() {
    let collector = RecordingCollector::start();
    let harness = Harness::otlp(&collector.traces_url(), |b| {
        b.with_attribute_value_length_limit(8_000)
            .with_span_export_batch_size(512)
    });
    let text = "w".repeat(8_000);
    harness.run(|| {
        for n in 0..400 {
            tracing::info_span!(
                "agent_execution",
                agent_name = "a",
                task = n,
                f1 = text.as_str(),
                f2 = text.as_str(),
                f3 = text.as_str(),
                f4 = text.as_str()
            )
            .in_scope(|| {});
        }
    });
    harness.telemetry().flush().unwrap();
    // 400 spans of 32 kB: 13 MB, in requests of at most 4 MiB.
    let requests = collector.requests();
    let bodies: Vec<usize> = requests.iter().map(|(_, length)| *length).collect();
    assert!(bodies.len() >= 3, "{bodies:?}");
    assert!(bodies.iter().all(|&length| length <= 4 << 20), "{bodies:?}");
    let exported = harness.scrape().value("agent_telemetry_spans_exported_total", &[]);
    assert_eq!(exported, Some(400.0));
}

/// A caller's `traceparent` and the largest `tracestate` W3C allows: 32 members of 256-byte
/// keys and values, about 16 kB that every span of the trace below it carries.
fn incoming_with_a_full_tracestate() -> std::collections::HashMap<String, String> {
    let tracestate = (0..32)
        .map(|i| format!("k{}={}", format!("{i:03}").repeat(85), "v".repeat(256)))
        .collect::<Vec<_>>()
        .join(",");
    std::collections::HashMap::from([
        (
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        ),
        ("tracestate".to_owned(), tracestate),
    ])
}

#[test]
fn a_callers_tracestate_counts_toward_an_export_requests_byte_limit() {
    let collector = RecordingCollector::start();
    let harness = Harness::otlp(&collector.traces_url(), |b| b.with_span_export_batch_size(512));
    let incoming = incoming_with_a_full_tracestate();
    harness.run(|| {
        for _ in 0..512 {
            let span = tracing::info_span!("agent_execution", agent_name = "a", task = "t");
            assert!(continue_trace(&span, &incoming).unwrap());
            span.in_scope(|| {});
        }
    });
    harness.telemetry().flush().unwrap();
    // 512 spans of 16 kB: 8.4 MB, in requests of at most 4 MiB.
    let bodies: Vec<usize> = collector.requests().iter().map(|(_, length)| *length).collect();
    assert!(bodies.len() >= 3, "{bodies:?}");
    assert!(bodies.iter().all(|&length| length <= 4 << 20), "{bodies:?}");
    let exported = harness.scrape().value("agent_telemetry_spans_exported_total", &[]);
    assert_eq!(exported, Some(512.0));
}

#[test]
fn links_to_spans_with_a_full_tracestate_take_no_other_span_down() {
    let collector = RecordingCollector::start();
    let harness = Harness::otlp(&collector.traces_url(), |b| b.with_span_export_batch_size(512));
    let incoming = incoming_with_a_full_tracestate();
    harness.run(|| {
        let requests: Vec<tracing::Span> = (0..128)
            .map(|n| {
                let span = tracing::info_span!("agent_execution", agent_name = "request", task = n);
                assert!(continue_trace(&span, &incoming).unwrap());
                span
            })
            .collect();
        // Ten agents, each following all of them: 128 links of 16 kB, 2 MB a span.
        for _ in 0..10 {
            let batch = tracing::info_span!("agent_execution", agent_name = "batcher", task = "t");
            for request in &requests {
                batch.follows_from(request);
            }
            batch.in_scope(|| {});
        }
        tracing::info_span!("agent_execution", agent_name = "bystander", task = "t").in_scope(|| {});
    });
    harness.telemetry().flush().unwrap();
    // Together over the 16 MiB the OTLP client refuses; in requests of at most 4 MiB, all go.
    let bodies: Vec<usize> = collector.requests().iter().map(|(_, length)| *length).collect();
    assert!(bodies.iter().all(|&length| length <= 4 << 20), "{bodies:?}");
    let scrape = harness.scrape();
    assert_eq!(
        scrape.value("agent_telemetry_spans_exported_total", &[]),
        Some(139.0),
        "{bodies:?}"
    );
    assert_eq!(
        scrape.value("agent_telemetry_spans_export_failed_total", &[]),
        Some(0.0)
    );
}

#[test]
fn a_callers_tracestate_counts_toward_the_span_queues_32_mib() {
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::Mutex;

    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::SpanExporter;

    /// A collector that stalls: its first export waits until the test lets it go.
    #[derive(Debug)]
    struct Stalled {
        began: Mutex<Sender<()>>,
        release: Mutex<Receiver<()>>,
    }
    impl SpanExporter for Stalled {
        async fn export(&self, _: Vec<SpanData>) -> OTelSdkResult {
            let _ = self.began.lock().unwrap().send(());
            let _ = self.release.lock().unwrap().recv();
            Ok(())
        }
    }
    let (began, export_began) = channel();
    let (let_go, release) = channel::<()>();
    let harness = Harness::with(|b| {
        b.with_span_exporter(Stalled {
            began: Mutex::new(began),
            release: Mutex::new(release),
        })
        .with_span_queue_size(1_000_000)
        .with_span_export_batch_size(64)
        .with_span_export_delay(Duration::ZERO)
    });
    let incoming = incoming_with_a_full_tracestate();
    let run = |count: usize| {
        harness.run(|| {
            for _ in 0..count {
                let span = tracing::info_span!("agent_execution", agent_name = "a", task = "t");
                continue_trace(&span, &incoming).unwrap();
                span.in_scope(|| {});
            }
        })
    };
    run(64);
    export_began
        .recv_timeout(Duration::from_secs(10))
        .expect("the first export stalls");
    // 4,096 spans of 16 kB wait behind it: 67 MB, twice the queue's 32 MiB.
    run(4096);
    let dropped = harness
        .scrape()
        .value("agent_telemetry_spans_dropped_total", &[])
        .unwrap();
    drop(let_go);
    assert!(dropped >= 1_000.0, "{dropped} of 4,096 spans dropped");
}

// ---------------------------------------------------------------------------------------------
// Log files

/// The example for a second at `rate` executions a second in `dir`, without `/metrics` or
/// traces, started by `sh` after `setup` (a `ulimit`, a `umask`).
fn example_after(setup: &str, rate: u32, dir: &std::path::Path) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("{setup} && exec \"$0\" --duration 1 --rate {rate}"))
        .arg(support::example_binary())
        .current_dir(dir)
        .env("AGENT_TELEMETRY_METRICS_ADDR", "off")
        .env("OTEL_TRACES_EXPORTER", "none")
        .stdout(Stdio::null());
    command
}

#[cfg(unix)]
#[test]
fn a_log_file_at_the_file_size_limit_drops_lines_and_never_ends_the_process() {
    use std::os::unix::process::ExitStatusExt;
    let work = tempfile::tempdir().unwrap();
    // The first run leaves today's file at the limit, its last line cut; the restart finds it
    // so, and its newline before the next line cannot be written either.
    for run in ["first", "restart"] {
        // 16 blocks: a few kB, reached within the first second of lines.
        let output = example_after("ulimit -f 16", 2000, work.path()).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        // SIGXFSZ (25) would end it; the write fails with EFBIG instead, warned about.
        assert_eq!(output.status.signal(), None, "{run}: {stderr}");
        assert!(output.status.success(), "{run}: {stderr}");
        assert!(
            stderr.contains("cannot write agent execution log lines"),
            "{run}: {stderr}"
        );
    }
}

#[cfg(unix)]
#[test]
fn log_files_are_created_0640_and_directories_0750_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let status = example_after("umask 000", 20, work.path())
        .env("AGENT_TELEMETRY_LOG_DIR", "logs/agents")
        .status()
        .unwrap();
    assert!(status.success());
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let dir = work.path().join("logs/agents");
    assert_eq!(mode(&work.path().join("logs")), 0o750);
    assert_eq!(mode(&dir), 0o750);
    assert_eq!(mode(&support::log_file(&dir)), 0o640);
}

#[cfg(unix)]
#[test]
fn a_symlink_in_place_of_todays_file_is_never_followed() {
    let harness = Harness::new();
    harness.run(|| execute_agent("a", "before", None).unwrap());
    let path = support::log_file(harness.dir.path());
    harness.telemetry().flush().unwrap();

    // Replaced by a link to a file: lines are dropped and counted, the target untouched.
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("passwd");
    std::fs::write(&target, "root:x:0:0\n").unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&target, &path).unwrap();
    harness.run(|| (0..5).for_each(|n| execute_agent("a", &format!("linked {n}"), None).unwrap()));
    harness.telemetry().flush().unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "root:x:0:0\n");

    // A dangling link: its target is never created.
    let dangling = elsewhere.path().join("created-by-nobody");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&dangling, &path).unwrap();
    harness.run(|| execute_agent("a", "dangling", None).unwrap());
    harness.telemetry().flush().unwrap();
    assert!(!dangling.exists());

    let scrape = harness.scrape();
    assert_eq!(scrape.value("agent_telemetry_log_lines_dropped_total", &[]), Some(6.0));
    assert!(scrape.value("agent_telemetry_log_write_errors_total", &[]).unwrap() >= 2.0);

    // A symlink there at start is an error naming the setting.
    let result = AgentTelemetry::builder()
        .ignore_environment()
        .without_metrics_server()
        .with_traces_exporter(TracesExporter::None)
        .with_log_dir(harness.dir.path())
        .build::<tracing_subscriber::Registry>();
    let error = result.err().expect("a symlinked log file is refused").to_string();
    assert!(
        error.contains("AGENT_TELEMETRY_LOG_DIR") && error.contains("symbolic link"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// Scrubbing and task capture

#[test]
fn secrets_are_scrubbed_from_the_line_and_the_span_by_default() {
    let harness = Harness::new();
    let task = "deploy with token=ghs_0123456789abcdefghijklmnopqrstuvwxyzAB and Bearer abcdefghijklmnopqrstuvwx";
    harness.run(|| {
        tracing::info_span!(
            "agent_execution",
            agent_name = "devops",
            task,
            api_key = "k-123",
            db.password = "hunter2",
            gen_ai.request.max_tokens = 512_u64,
            prompt = "use sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX"
        )
        .in_scope(|| tracing::error!("login failed for password=hunter2"));
    });
    let line = &harness.log_lines()[0];
    for secret in ["ghs_0123", "abcdefghijklmnopqrstuvwx", "hunter2", "k-123", "sk-proj"] {
        assert!(!line.contains(secret), "{secret} in {line}");
    }
    assert_eq!(
        field(line, "task").unwrap(),
        "deploy with token=[REDACTED] and Bearer [REDACTED]"
    );
    assert_eq!(
        field(line, "error.message").unwrap(),
        "login failed for password=[REDACTED]"
    );
    let spans = harness.spans();
    let span = &spans[0];
    assert_eq!(attribute(span, "api_key").as_deref(), Some("[REDACTED]"));
    assert_eq!(attribute(span, "db.password").as_deref(), Some("[REDACTED]"));
    assert_eq!(attribute(span, "prompt").as_deref(), Some("use [REDACTED]"));
    let tokens = span
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "gen_ai.request.max_tokens");
    assert_eq!(tokens.map(|kv| kv.value.clone()), Some(opentelemetry::Value::I64(512)));
    assert_eq!(
        attribute(span, "task").as_deref(),
        Some("deploy with token=[REDACTED] and Bearer [REDACTED]")
    );
    let debug = format!("{span:?}");
    for secret in ["ghs_0123", "hunter2", "k-123", "sk-proj"] {
        assert!(!debug.contains(secret), "{secret} in the span");
    }
}

#[test]
fn a_secret_in_an_agents_model_or_providers_name_is_scrubbed_in_every_signal() {
    let key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD";
    let run = |harness: &Harness| {
        harness.run(|| {
            // Twice: the second finds the name scrubbed already on this thread.
            for _ in 0..2 {
                tracing::info_span!("agent_execution", agent_name = key, task = "t").in_scope(|| {
                    tracing::info_span!(
                        "chat",
                        gen_ai.request.model = key,
                        gen_ai.provider.name = key,
                        gen_ai.usage.input_tokens = 5_u64
                    )
                    .in_scope(|| {});
                });
            }
            // A model call in no execution is counted as it ends.
            tracing::info_span!("chat", gen_ai.request.model = key, gen_ai.usage.input_tokens = 5_u64).in_scope(|| {});
        });
        let spans = harness.spans();
        let lines = harness.log_lines();
        let (status, metrics) = support::http(harness.telemetry().metrics_addr().unwrap(), "GET", "/metrics");
        assert_eq!(status, 200);
        (spans, lines, metrics)
    };

    let (spans, lines, metrics) = run(&Harness::new());
    assert_eq!((spans.len(), lines.len()), (5, 2));
    for span in &spans {
        for kv in &span.attributes {
            assert!(!kv.value.as_str().contains(key), "{} = {}", kv.key, kv.value);
        }
    }
    let operation = |span: &&SpanData| attribute(span, "gen_ai.operation.name");
    let agents: Vec<&SpanData> = spans
        .iter()
        .filter(|span| operation(span).as_deref() == Some("invoke_agent"))
        .collect();
    let calls: Vec<&SpanData> = spans
        .iter()
        .filter(|span| operation(span).as_deref() == Some("chat"))
        .collect();
    assert_eq!((agents.len(), calls.len()), (2, 3));
    for agent in &agents {
        for name in [
            "agent.name",
            "gen_ai.agent.name",
            "gen_ai.request.model",
            "gen_ai.provider.name",
        ] {
            assert_eq!(attribute(agent, name).as_deref(), Some("[REDACTED]"), "{name}");
        }
    }
    for call in &calls {
        for name in ["gen_ai.request.model", "llm.model_name"] {
            assert_eq!(attribute(call, name).as_deref(), Some("[REDACTED]"), "{name}");
        }
    }
    for line in &lines {
        assert!(!line.contains(key), "{line}");
        assert_eq!(field(line, "agent_name").unwrap(), "[REDACTED]");
        assert_eq!(field(line, "model").unwrap(), "[REDACTED]");
    }
    assert!(!metrics.contains(key), "{metrics}");
    assert!(
        metrics.contains(r#"agent_executions_total{agent_name="[REDACTED]",status="success"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"agent_model_calls_total{agent_name="unknown",model="[REDACTED]",status="success"} 1"#),
        "{metrics}"
    );

    // Names are kept as they are when scrubbing is off.
    let (spans, lines, metrics) = run(&Harness::with(|b| b.with_scrubbing(Scrubbing::off())));
    assert!(spans
        .iter()
        .any(|span| attribute(span, "agent.name").as_deref() == Some(key)));
    assert_eq!(field(&lines[0], "model").unwrap(), key);
    assert!(metrics.contains(key));
}

#[test]
fn a_secret_across_the_cut_of_a_name_or_status_is_scrubbed_whole() {
    let harness = Harness::new();
    // The label limit is 256 characters: the key starts at 241 and ends past it.
    let name = format!("{} sk-proj-abcdefghijklmnopqrstuvwxyz0123456789", "x".repeat(240));
    harness.run(|| {
        let agent = tracing::info_span!(
            "agent_execution",
            agent_name = name.as_str(),
            task = "t",
            status = name.as_str()
        );
        agent.in_scope(|| {
            tracing::info_span!(
                "chat",
                gen_ai.request.model = name.as_str(),
                gen_ai.usage.input_tokens = 5_u64
            )
            .in_scope(|| {});
        });
    });
    let expected = format!("{} [REDACTED]", "x".repeat(240));
    let spans = harness.spans();
    let agent = support::agent_span(&spans, &expected);
    for key in ["gen_ai.agent.name", "gen_ai.request.model", "error.type"] {
        assert_eq!(attribute(agent, key).as_deref(), Some(expected.as_str()), "{key}");
    }
    let line = &harness.log_lines()[0];
    assert!(!line.contains("sk-proj"), "{line}");
    assert_eq!(field(line, "agent_name").unwrap(), expected.as_str());
    let (_, metrics) = support::http(harness.telemetry().metrics_addr().unwrap(), "GET", "/metrics");
    assert!(!metrics.contains("sk-proj"), "{metrics}");
    assert!(metrics.contains(&format!(r#"agent_name="{expected}""#)), "{metrics}");
}

#[test]
fn scrubbing_can_be_extended_or_turned_off() {
    let harness = Harness::with(|b| {
        b.with_scrubbing(
            Scrubbing::default()
                .with_field_names(["customer_id"])
                .with_patterns([r"\bACME-[0-9]{8}\b"]),
        )
    });
    harness.run(|| {
        tracing::info_span!(
            "agent_execution",
            agent_name = "a",
            task = "ship ACME-12345678",
            customer_id = 42
        )
        .in_scope(|| {});
    });
    assert_eq!(field(&harness.log_lines()[0], "task").unwrap(), "ship [REDACTED]");
    assert_eq!(
        attribute(&harness.spans()[0], "customer_id").as_deref(),
        Some("[REDACTED]")
    );

    let off = Harness::with(|b| b.with_scrubbing(Scrubbing::off()));
    off.run(|| execute_agent("a", "password=hunter2", None).unwrap());
    assert_eq!(field(&off.log_lines()[0], "task").unwrap(), "password=hunter2");
}

#[test]
fn the_task_is_captured_in_full_as_a_hash_or_not_at_all() {
    let hashed = Harness::with(|b| b.with_task_capture(TaskCapture::Hash));
    hashed.run(|| {
        execute_agent("a", "Summarise the Q3 contract", None).unwrap();
        execute_agent("a", "Summarise the Q3 contract", None).unwrap();
        execute_agent("a", "Summarise the Q4 contract", None).unwrap();
    });
    let lines = hashed.log_lines();
    let hashes: Vec<String> = lines
        .iter()
        .map(|line| field(line, "task").unwrap().as_str().unwrap().to_owned())
        .collect();
    assert!(hashes[0].starts_with("sha256:") && hashes[0].len() == 23, "{hashes:?}");
    assert_eq!(hashes[0], hashes[1], "identical tasks group");
    assert_ne!(hashes[0], hashes[2]);
    assert!(lines.iter().all(|line| !line.contains("contract")));
    let spans = hashed.spans();
    assert!(spans
        .iter()
        .all(|span| attribute(span, "task").is_some_and(|t| hashes.contains(&t))));

    let off = Harness::with(|b| b.with_task_capture(TaskCapture::Off));
    off.run(|| execute_agent("a", "Summarise the Q3 contract", None).unwrap());
    let line = &off.log_lines()[0];
    assert_eq!(field(line, "task"), None, "{line}");
    assert!(!line.contains("contract"));
    assert_eq!(attribute(&off.spans()[0], "task"), None);
}

/// A secret of one of the kinds scrubbing knows, and the part of it that must never leave.
/// A secret whose `Debug` counts how often it runs.
struct CountedSecret;

static SECRET_FORMATTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl std::fmt::Debug for CountedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        SECRET_FORMATTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f.write_str("hunter2")
    }
}

#[test]
fn a_recorded_value_no_signal_keeps_is_never_formatted() {
    use tracing::field::{debug, Empty};
    // Traces on: a sensitive name is sent as `[REDACTED]`. Traces off: no signal keeps a field
    // that is not the execution's.
    for (harness, unkept) in [
        (Harness::new(), &["api_key"][..]),
        (Harness::untraced(), &["api_key", "payload"]),
    ] {
        harness.run(|| {
            let span = tracing::info_span!(
                "agent_execution",
                agent_name = "a",
                task = "t",
                api_key = Empty,
                payload = Empty
            );
            for field in unkept {
                span.record(*field, debug(CountedSecret));
            }
        });
        assert_eq!(harness.log_lines().len(), 1);
    }
    assert_eq!(SECRET_FORMATTED.load(std::sync::atomic::Ordering::Relaxed), 0);
}

fn secret() -> impl Strategy<Value = (String, String)> {
    let token = "[A-Za-z0-9]{20,40}";
    prop_oneof![
        token.prop_map(|t| (format!("Bearer {t}"), t)),
        token.prop_map(|t| (format!("sk-proj-{t}"), format!("sk-proj-{t}"))),
        "[A-Z0-9]{16}".prop_map(|t| (format!("AKIA{t}"), format!("AKIA{t}"))),
        ("[A-Za-z0-9_-]{10,20}", "[A-Za-z0-9_-]{10,20}", "[A-Za-z0-9_-]{10,20}").prop_map(|(a, b, c)| {
            let jwt = format!("eyJ{a}.{b}.{c}");
            (jwt.clone(), jwt)
        }),
        token.prop_map(|t| (format!("password={t}"), t)),
        token.prop_map(|t| (format!(r#"{{"authorization": "Basic {t}"}}"#), t)),
        token.prop_map(|t| (format!("AWS_SECRET_ACCESS_KEY={t}"), t)),
        token.prop_map(|t| (format!("WALLET_PRIVATE_KEY={t}"), t)),
        token.prop_map(|t| (format!("credentials:\n  password: {t}"), t)),
        // A token, and a token's key, starting a line of a `Debug` string, after its `\n`.
        "[A-Za-z0-9]{34}".prop_map(|t| (format!("{:?}", format!("out:\nhf_{t}")), t)),
        token.prop_map(|t| (format!("{:?}", format!("HOME=/root\naccess_token={t}")), t)),
        token.prop_map(|t| {
            let request = format!("GET / HTTP/1.1\r\nX-Api-Key: k1\r\nAuthorization: Basic {t}\r\n");
            (format!("{request:?}"), t)
        }),
        token.prop_map(|t| (format!("postgres://admin:{t}@db:5432/app"), t)),
        "[A-Za-z0-9]{34}".prop_map(|t| (format!("HF_TOKEN=hf_{t}"), t)),
        // JSON as a `Debug` string shows it, its quotes escaped.
        token.prop_map(|t| (format!("{:?}", format!(r#"{{"api_key": "{t}", "n": 1}}"#)), t)),
        "[A-Za-z0-9+/]{40,80}".prop_map(|t| (
            format!("-----BEGIN PRIVATE KEY-----\n{t}\n-----END PRIVATE KEY-----"),
            t
        )),
    ]
}

/// Text around a secret: words, without characters that could join the secret's own.
fn prose() -> impl Strategy<Value = String> {
    "[a-z ]{0,40}".prop_map(|text| format!(" {text} "))
}

#[test]
fn no_scrubbed_secret_survives_in_any_signal() {
    let harness = Harness::new();
    let config = ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let executions = std::cell::Cell::new(0);
    let outcome = runner.run(
        &(prose(), secret(), prose(), secret(), any::<bool>()),
        |(before, (in_task, task_secret), after, (in_error, error_secret), fails)| {
            let task = format!("{before}{in_task}{after}");
            let error = format!("failed:{before}{in_error}");
            harness.run(|| execute_agent("agent", &task, fails.then_some(error.as_str())).ok());
            executions.set(executions.get() + 1);
            let lines = harness.log_lines();
            let line = lines.last().unwrap();
            let spans = harness.spans();
            let span = format!("{:?}", spans.last().unwrap());
            let scrape = harness.scrape().text;
            for (secret, signal) in [
                (&task_secret, line.as_str()),
                (&task_secret, span.as_str()),
                (&error_secret, line.as_str()),
                (&error_secret, span.as_str()),
                (&task_secret, scrape.as_str()),
            ] {
                prop_assert!(!signal.contains(secret.as_str()), "{secret:?} left in {signal}");
            }
            prop_assert_eq!(lines.len(), executions.get());
            Ok(())
        },
    );
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}
